//! The tcp-server workload's line protocol: `ping <n>` is answered by `pong <n> <served>`.

/// Parse one received line (without or with its trailing newline) as `ping <n>`.
pub fn parse_ping(line: &str) -> Result<u64, String> {
    let line = line.trim_end_matches(['\n', '\r']);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ping"), Some(n), None) => n.parse::<u64>().map_err(|e| format!("bad ping number {n:?}: {e}")),
        _ => Err(format!("expected \"ping <n>\", got {line:?}")),
    }
}

/// The answer to `ping <n>` when `served` lines (including this one) have been served on the connection.
pub fn format_pong(n: u64, served: u64) -> String {
    format!("pong {n} {served}\n")
}

/// Parse an answer `pong <n> <served>` (used by clients, e.g. the testbed's tests).
pub fn parse_pong(line: &str) -> Result<(u64, u64), String> {
    let line = line.trim_end_matches(['\n', '\r']);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("pong"), Some(n), Some(s), None) => {
            let n = n.parse::<u64>().map_err(|e| format!("bad pong number {n:?}: {e}"))?;
            let s = s.parse::<u64>().map_err(|e| format!("bad served count {s:?}: {e}"))?;
            Ok((n, s))
        }
        _ => Err(format!("expected \"pong <n> <served>\", got {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_parses() {
        assert_eq!(parse_ping("ping 0"), Ok(0));
        assert_eq!(parse_ping("ping 42\n"), Ok(42));
        assert_eq!(parse_ping("ping 18446744073709551615\r\n"), Ok(u64::MAX));
    }

    #[test]
    fn ping_rejects_garbage() {
        for bad in ["", "ping", "ping ", "ping x", "ping 1 2", "pong 1", "PING 1", " ping 1", "ping -1"] {
            assert!(parse_ping(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pong_roundtrip() {
        let s = format_pong(7, 3);
        assert_eq!(s, "pong 7 3\n");
        assert_eq!(parse_pong(&s), Ok((7, 3)));
        assert!(parse_pong("pong 7").is_err());
        assert!(parse_pong("ping 7 3").is_err());
    }
}
