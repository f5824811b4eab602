//! The benches' settings from the environment (`NUDGE_BENCH_*`): a variable set to nothing
//! counts as unset, and a number that does not parse stops the bench with exit 64.

/// The variable's value, `None` when unset or blank.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The variable as a number, or `default`; exits 64 saying which variable is wrong.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match env(name) {
        Some(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("bench: {name}={text} is not a number");
            std::process::exit(64)
        }),
        None => default,
    }
}

/// The variable (or `default`) split at commas, blanks dropped.
pub fn env_list(name: &str, default: &str) -> Vec<String> {
    env(name)
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}
