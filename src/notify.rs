//! sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. "READY=1") when running under a `Type=notify` unit; a no-op otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        // A leading '@' names a socket in the abstract namespace (systemd.exec(5)).
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("sd_notify {state:?} to {path}: {e}");
    }
}
