//! The four answers a poll can get (SPEC §2), with their wire form in one place: the hub
//! decides them, the metrics count them, both HTTP paths write them.

/// What a poll is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A publish reached the channel: the client fetches its data, then polls again.
    NewChange,
    /// Poll again: the park time ran out with nothing new, or the node drains.
    Reconnect,
    /// The channel spent its retries or is not live (expired, revoked, unknown): the client
    /// asks the main API for a new one.
    MaxRetries,
    /// `dont_block` was asked and nothing is pending.
    NoChange,
}

impl Answer {
    /// Every answer, in the order of [`Answer::index`].
    pub const ALL: [Answer; 4] = [
        Answer::NewChange,
        Answer::Reconnect,
        Answer::MaxRetries,
        Answer::NoChange,
    ];

    /// The `message` of the answer body, and the `outcome` label of `nudge_polls_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::NewChange => "new_change",
            Answer::Reconnect => "reconnect",
            Answer::MaxRetries => "max_retries",
            Answer::NoChange => "no_change",
        }
    }

    /// Its place in [`Answer::ALL`], for tables built once per answer.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The JSON body, `{"message":"…"}`.
    pub fn body(self) -> &'static [u8] {
        match self {
            Answer::NewChange => br#"{"message":"new_change"}"#,
            Answer::Reconnect => br#"{"message":"reconnect"}"#,
            Answer::MaxRetries => br#"{"message":"max_retries"}"#,
            Answer::NoChange => br#"{"message":"no_change"}"#,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_body_and_name_agree() {
        for (i, a) in Answer::ALL.into_iter().enumerate() {
            assert_eq!(a.index(), i);
            let body: serde_json::Value = serde_json::from_slice(a.body()).unwrap();
            assert_eq!(body, serde_json::json!({ "message": a.as_str() }));
        }
    }
}
