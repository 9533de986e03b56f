//! An LXC container configuration (`lxc.container.conf(5)`): `key = value` lines, comments and blank lines kept
//! as they are, so that a rewritten file differs from the original only in the keys phaul changed.

/// One container configuration, line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A comment, a blank line, or a line that is not `key = value` (kept verbatim).
    Other(String),
    Entry {
        key: String,
        value: String,
    },
}

impl Config {
    pub fn parse(text: &str) -> Config {
        let lines = text
            .lines()
            .map(|l| {
                let t = l.trim();
                if t.starts_with('#') || t.is_empty() {
                    return Line::Other(l.to_string());
                }
                match t.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        Line::Entry { key: k.trim().to_string(), value: v.trim().to_string() }
                    }
                    _ => Line::Other(l.to_string()),
                }
            })
            .collect();
        Config { lines }
    }

    /// The last value of `key` (LXC's rule for single-valued keys).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries().filter(|(k, _)| *k == key).map(|(_, v)| v).last()
    }

    /// Every `(key, value)` in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Entry { key, value } => Some((key.as_str(), value.as_str())),
            Line::Other(_) => None,
        })
    }

    /// Every value of `key`, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries().filter(move |(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Sets `key` to `value`: the first line with that key gets the value, later ones go; appended when absent.
    pub fn set(&mut self, key: &str, value: &str) {
        let mut seen = false;
        self.lines.retain_mut(|l| match l {
            Line::Entry { key: k, value: v } if k == key => {
                if seen {
                    return false;
                }
                seen = true;
                *v = value.to_string();
                true
            }
            _ => true,
        });
        if !seen {
            self.lines.push(Line::Entry { key: key.to_string(), value: value.to_string() });
        }
    }

    /// Appends a `key = value` line (for keys LXC allows several times, such as hooks).
    pub fn push(&mut self, key: &str, value: &str) {
        self.lines.push(Line::Entry { key: key.to_string(), value: value.to_string() });
    }

    /// Turns every `key` line into a comment saying why.
    pub fn comment_out(&mut self, key: &str, why: &str) {
        for l in &mut self.lines {
            if let Line::Entry { key: k, value } = l {
                if k == key {
                    *l = Line::Other(format!("# {k} = {value}    # {why}"));
                }
            }
        }
    }

    /// Removes the `key = value` lines for which `drop` is true.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&str, &str) -> bool) {
        self.lines.retain(|l| match l {
            Line::Entry { key, value } => !drop(key, value),
            Line::Other(_) => true,
        });
    }

    /// The indices of the `lxc.net.N` network devices, in order.
    pub fn net_indices(&self) -> Vec<u32> {
        let mut v: Vec<u32> =
            self.entries().filter_map(|(k, _)| k.strip_prefix("lxc.net.")?.split('.').next()?.parse().ok()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            match l {
                Line::Other(t) => s.push_str(t),
                Line::Entry { key, value } => {
                    s.push_str(key);
                    s.push_str(" = ");
                    s.push_str(value);
                }
            }
            s.push('\n');
        }
        s
    }
}

/// Where `lxc.rootfs.path` keeps the root filesystem: the backing store and the host path (or dataset) it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// `dir`, `btrfs`, `zfs`, `overlay`, `lvm`, ... (`dir` when the value is a plain path).
    pub kind: String,
    pub path: String,
}

impl Rootfs {
    pub fn parse(value: &str) -> Rootfs {
        match value.split_once(':') {
            Some((kind, path)) if !kind.contains('/') => Rootfs { kind: kind.to_string(), path: path.to_string() },
            _ => Rootfs { kind: "dir".into(), path: value.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# a comment\nlxc.net.0.type = veth\nlxc.net.0.link = lxcbr0\n\nlxc.rootfs.path = dir:/var/lib/lxc/c1/rootfs\nlxc.tty.max = 4\nlxc.net.1.type=empty\nlxc.mount.entry = /lib lib none ro,bind 0 0\nlxc.mount.entry = /usr/lib usr/lib none ro,bind 0 0\n";

    #[test]
    fn reads_keys_and_net_devices() {
        let c = Config::parse(SAMPLE);
        assert_eq!(c.get("lxc.net.0.link"), Some("lxcbr0"));
        assert_eq!(c.get("lxc.net.1.type"), Some("empty"));
        assert_eq!(c.get("lxc.tty.max"), Some("4"));
        assert_eq!(c.get("lxc.nothing"), None);
        assert_eq!(c.all("lxc.mount.entry").count(), 2);
        assert_eq!(c.net_indices(), vec![0, 1]);
    }

    #[test]
    fn rewrites_only_what_it_is_told() {
        let mut c = Config::parse(SAMPLE);
        c.set("lxc.net.0.link", "br1");
        c.set("lxc.start.auto", "0");
        c.comment_out("lxc.tty.max", "not here");
        let out = c.render();
        assert!(out.starts_with("# a comment\nlxc.net.0.type = veth\nlxc.net.0.link = br1\n\n"));
        assert!(out.contains("# lxc.tty.max = 4    # not here\n"));
        assert!(out.ends_with("lxc.start.auto = 0\n"));
        let again = Config::parse(&out);
        assert_eq!(again.get("lxc.tty.max"), None);
        assert_eq!(again.get("lxc.rootfs.path"), Some("dir:/var/lib/lxc/c1/rootfs"));
    }

    #[test]
    fn set_keeps_one_line() {
        let mut c = Config::parse("a = 1\nb = 2\na = 3\n");
        c.set("a", "9");
        assert_eq!(c.render(), "a = 9\nb = 2\n");
    }

    #[test]
    fn rootfs_forms() {
        assert_eq!(Rootfs::parse("dir:/x/rootfs"), Rootfs { kind: "dir".into(), path: "/x/rootfs".into() });
        assert_eq!(Rootfs::parse("/x/rootfs"), Rootfs { kind: "dir".into(), path: "/x/rootfs".into() });
        assert_eq!(Rootfs::parse("btrfs:/x/rootfs").kind, "btrfs");
        assert_eq!(Rootfs::parse("zfs:tank/lxc/c1"), Rootfs { kind: "zfs".into(), path: "tank/lxc/c1".into() });
    }
}
