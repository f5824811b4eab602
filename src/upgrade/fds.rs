//! Passing descriptors over a Unix socket (`SCM_RIGHTS`): the one place of the crate with
//! `unsafe`, because a descriptor the kernel hands us arrives as a bare number.
//!
//! One message carries one byte and at most [`MAX_FDS_PER_MESSAGE`] descriptors (the
//! kernel's `SCM_MAX_FD` is 253). The receiver reads one byte per `recvmsg`, so every
//! message's descriptors come out with it and none are cut off.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Descriptors sent in one message: under the kernel's `SCM_MAX_FD` (253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Sends `fds` (at most [`MAX_FDS_PER_MESSAGE`]) in one message. The descriptors stay open
/// here: the receiver gets its own, for the same open sockets.
pub fn send(socket: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS_PER_MESSAGE, "one message's worth");
    let iov = [io::IoSlice::new(b"F")];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent != 1 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "descriptor message not sent",
        ));
    }
    Ok(())
}

/// Receives one message's descriptors, owned from here on (and close-on-exec).
pub fn recv(socket: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE + 3]);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut owned = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: `fd` was installed in this process's descriptor table by the
                // kernel during this very `recvmsg` (SCM_RIGHTS), and this loop is the only
                // code that has seen the number: nothing else owns or closes it, so
                // `OwnedFd` becoming its one owner is sound.
                owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
    }
    Ok(owned)
}
