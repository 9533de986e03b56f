//! What thin-provisioning-tools print, read: `thin_dump --dev-id N` (a thin device's mappings) and `thin_delta
//! --snap1 A --snap2 B` (how two thin devices differ), both as XML, both in the pool's blocks (`data_block_size`,
//! in 512-byte sectors, on the `superblock` element). Only the elements and attributes this driver needs are read;
//! anything else is skipped, and nothing here panics on what a tool printed.

#![forbid(unsafe_code)]

/// A range of a thin device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// The bytes must be read from the newer snapshot (`true`) or are zeros there (`false`: a block the newer
    /// snapshot no longer maps).
    pub copy: bool,
}

/// The elements of an XML text: name and attributes, in order (closing tags and text are skipped).
fn elements(xml: &str) -> impl Iterator<Item = (&str, Vec<(&str, &str)>)> + '_ {
    let mut rest = xml;
    std::iter::from_fn(move || loop {
        let start = rest.find('<')?;
        let after = &rest[start + 1..];
        let end = after.find('>')?;
        let tag = &after[..end];
        rest = &after[end + 1..];
        if tag.starts_with('/') || tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        let tag = tag.trim_end_matches('/');
        let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
        let name = &tag[..name_end];
        let mut attrs = Vec::new();
        let mut a = &tag[name_end..];
        while let Some(eq) = a.find('=') {
            let key = a[..eq].trim();
            let v = a[eq + 1..].trim_start();
            let Some(q) = v.chars().next().filter(|c| *c == '"' || *c == '\'') else { break };
            let v = &v[1..];
            let Some(close) = v.find(q) else { break };
            attrs.push((key, &v[..close]));
            a = &v[close + 1..];
        }
        return Some((name, attrs));
    })
}

fn attr<'a>(attrs: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

fn num(attrs: &[(&str, &str)], key: &str, element: &str) -> Result<u64, String> {
    let v = attr(attrs, key).ok_or_else(|| format!("a <{element}> element without {key}"))?;
    v.parse().map_err(|_| format!("<{element} {key}=\"{v}\">: not a number"))
}

/// The pool's block size in bytes, from the `superblock` element.
fn block_bytes(attrs: &[(&str, &str)]) -> Result<u64, String> {
    let sectors = num(attrs, "data_block_size", "superblock")?;
    if sectors == 0 || sectors > 1 << 21 {
        return Err(format!("a data block size of {sectors} sectors"));
    }
    Ok(sectors * 512)
}

/// Adds a block range (in blocks) as bytes, clipped to `size`, merged with the last one when they touch.
fn push(out: &mut Vec<Extent>, begin: u64, length: u64, block: u64, size: u64, copy: bool) -> Result<(), String> {
    let offset = begin.checked_mul(block).ok_or("a block number out of range")?;
    let len = length.checked_mul(block).ok_or("a block count out of range")?;
    if length == 0 || offset >= size {
        return Ok(());
    }
    let len = len.min(size - offset);
    if let Some(last) = out.last_mut() {
        if last.copy == copy && last.offset + last.len == offset {
            last.len += len;
            return Ok(());
        }
    }
    out.push(Extent { offset, len, copy });
    Ok(())
}

/// A parse's result: the extents and the pool's block size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub block: u64,
    pub extents: Vec<Extent>,
}

fn sorted(mut p: Parsed) -> Result<Parsed, String> {
    p.extents.sort_by_key(|e| e.offset);
    for w in p.extents.windows(2) {
        if w[0].offset + w[0].len > w[1].offset {
            return Err(format!("overlapping ranges at byte {}", w[1].offset));
        }
    }
    Ok(p)
}

/// `thin_dump --dev-id N` of a device of `size` bytes: the mapped ranges (all to copy).
pub fn parse_dump(xml: &str, size: u64) -> Result<Parsed, String> {
    let mut block = None;
    let mut extents = Vec::new();
    let mut devices = 0;
    for (name, attrs) in elements(xml) {
        match name {
            "superblock" => block = Some(block_bytes(&attrs)?),
            "device" => devices += 1,
            "range_mapping" | "single_mapping" => {
                let b = block.ok_or("a mapping before the superblock")?;
                let (begin, length) = if name == "range_mapping" {
                    (num(&attrs, "origin_begin", name)?, num(&attrs, "length", name)?)
                } else {
                    (num(&attrs, "origin_block", name)?, 1)
                };
                push(&mut extents, begin, length, b, size, true)?;
            }
            _ => {}
        }
    }
    let block = block.ok_or("thin_dump printed no superblock")?;
    if devices != 1 {
        return Err(format!("thin_dump printed {devices} devices, not the one asked for"));
    }
    sorted(Parsed { block, extents })
}

/// `thin_delta --snap1 OLD --snap2 NEW` for devices of `size` bytes: what changed from OLD to NEW (`different`
/// and `right_only` ranges are copied from NEW, `left_only` ones are zeros in NEW, `same` ones are skipped).
pub fn parse_delta(xml: &str, size: u64) -> Result<Parsed, String> {
    let mut block = None;
    let mut extents = Vec::new();
    let mut diffs = 0;
    for (name, attrs) in elements(xml) {
        let copy = match name {
            "superblock" => {
                block = Some(block_bytes(&attrs)?);
                continue;
            }
            "diff" => {
                diffs += 1;
                continue;
            }
            "different" | "right_only" => true,
            "left_only" => false,
            _ => continue,
        };
        let b = block.ok_or("a range before the superblock")?;
        push(&mut extents, num(&attrs, "begin", name)?, num(&attrs, "length", name)?, b, size, copy)?;
    }
    let block = block.ok_or("thin_delta printed no superblock")?;
    if diffs != 1 {
        return Err(format!("thin_delta printed {diffs} diffs, not one"));
    }
    sorted(Parsed { block, extents })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELTA: &str = r#"<?xml version="1.0"?>
<superblock uuid="" time="3" transaction="6" data_block_size="128" nr_data_blocks="3200">
  <diff left="1" right="2">
    <same begin="0" length="10"/>
    <different begin="10" length="2"/>
    <right_only begin="12" length="1"/>
    <same begin="13" length="100"/>
    <left_only begin="113" length="3"/>
    <different begin="4000" length="8"/>
  </diff>
</superblock>
"#;

    #[test]
    fn a_delta_gives_the_changed_and_unmapped_ranges_in_bytes() {
        let p = parse_delta(DELTA, 4001 * 65536).expect("parse");
        assert_eq!(p.block, 65536);
        assert_eq!(
            p.extents,
            vec![
                // different 10+2 and right_only 12+1 merge.
                Extent { offset: 10 * 65536, len: 3 * 65536, copy: true },
                Extent { offset: 113 * 65536, len: 3 * 65536, copy: false },
                // Clipped to the device's size.
                Extent { offset: 4000 * 65536, len: 65536, copy: true },
            ]
        );
    }

    #[test]
    fn a_verbose_delta_and_an_empty_one_parse() {
        let verbose = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">
  <diff left="1" right="2">
    <different begin="5" data_begin="77" length="1"/>
  </diff>
</superblock>"#;
        let p = parse_delta(verbose, 1 << 30).expect("verbose");
        assert_eq!(p.extents, vec![Extent { offset: 5 * 65536, len: 65536, copy: true }]);
        let empty = r#"<superblock uuid="" time="1" transaction="2" data_block_size="1024" nr_data_blocks="0">
  <diff left="1" right="2">
  </diff>
</superblock>"#;
        let p = parse_delta(empty, 1 << 30).expect("empty");
        assert_eq!(p.block, 512 * 1024);
        assert!(p.extents.is_empty());
    }

    #[test]
    fn a_dump_gives_the_mapped_ranges() {
        let dump = r#"<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="3200">
  <device dev_id="2" mapped_blocks="6" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="4" data_block="9" time="1"/>
    <single_mapping origin_block="9" data_block="10" time="1"/>
  </device>
</superblock>"#;
        let p = parse_dump(dump, 1 << 30).expect("dump");
        assert_eq!(
            p.extents,
            vec![
                Extent { offset: 0, len: 5 * 65536, copy: true },
                Extent { offset: 9 * 65536, len: 65536, copy: true }
            ]
        );
    }

    #[test]
    fn what_a_tool_should_not_print_is_an_error_not_a_panic() {
        assert!(parse_delta("", 1 << 20).is_err());
        assert!(parse_delta("<superblock data_block_size=\"0\"><diff></diff></superblock>", 1 << 20).is_err());
        assert!(parse_delta(
            "<superblock data_block_size=\"128\"><diff><different begin=\"x\" length=\"1\"/>",
            1 << 20
        )
        .is_err());
        assert!(parse_delta(
            "<superblock data_block_size=\"128\"><diff><different begin=\"18446744073709551615\" length=\"2\"/>",
            1 << 20
        )
        .is_err());
        assert!(parse_delta("<different begin=\"1\" length=\"1\"/>", 1 << 20).is_err());
        // Two diffs, or overlapping ranges.
        assert!(parse_delta("<superblock data_block_size=\"128\"><diff></diff><diff></diff></superblock>", 1 << 20)
            .is_err());
        assert!(parse_delta(
            "<superblock data_block_size=\"128\"><diff><different begin=\"1\" length=\"3\"/><left_only begin=\"2\" length=\"1\"/></diff>",
            1 << 30
        )
        .is_err());
        assert!(parse_dump("<superblock data_block_size=\"128\"></superblock>", 1 << 20).is_err());
        for s in ["<", "<<>>", "<a b=\"", "<a b='1' c=>", "<superblock data_block_size='128'", "\u{fffd}<é=\"\"/>"] {
            let _ = parse_delta(s, 1 << 20);
            let _ = parse_dump(s, 1 << 20);
        }
    }
}
