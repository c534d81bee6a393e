//! Wake-on-LAN magic packets.

use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};

use super::config::mac_bytes;

/// Six 0xFF bytes, then the MAC sixteen times.
pub fn magic_packet(mac: [u8; 6]) -> [u8; 102] {
    let mut p = [0xFFu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac);
    }
    p
}

/// Sends one packet per MAC to `to`; returns how many were sent.
pub fn wake(macs: &[&str], to: SocketAddr) -> Result<usize> {
    let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .context("opening a UDP socket")?;
    sock.set_broadcast(true)?;
    for mac in macs {
        sock.send_to(&magic_packet(mac_bytes(mac)?), to)
            .with_context(|| format!("sending to {to}"))?;
    }
    Ok(macs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_magic_packets() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let n = wake(&["52:54:00:aa:bb:cc"], rx.local_addr().unwrap()).unwrap();
        assert_eq!(n, 1);
        let mut buf = [0u8; 200];
        let (len, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(len, 102);
        assert_eq!(&buf[..6], &[0xFF; 6]);
        assert_eq!(&buf[96..102], &[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    }
}
