//! The seed corpus: real messages encoded by phaul's own types, the repository's plugins.toml, and CRIU images
//! (written here in CRIU's format from phaul's entry types; `fuzz/criu-seeds` adds images a real CRIU dump wrote).
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen-corpus` writes them to `fuzz/corpus/TARGET/`.
//!
//! A seed whose name starts with `bad-` is one the decoder must refuse; every other one it must accept (the tests
//! check both).

use std::path::Path;

use phaul_core::images::{
    FILES_MAGIC, IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC, STATS_MAGIC, TTY_DATA_MAGIC, TTY_INFO_MAGIC,
};
use phaul_proto::criu::{
    DumpStatsEntry, FdTypes, FileEntry, RestoreStatsEntry, StatsEntry, TtyDataEntry, TtyFileEntry, TtyInfoEntry,
    TtyPtyEntry, TtyType,
};
use phaul_proto::external::{ExternalMessage, ExternalType};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, Envelope};
use phaul_proto::PROTOCOL_VERSION;
use prost::Message;

/// One seed file: `corpus/TARGET/NAME`.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

const SESSION: &str = "3f2a9c0d5e8b47a1b6c4d2e0f9a8b7c6";

fn kv(k: &str, v: &str) -> w::KeyValue {
    w::KeyValue { key: k.into(), value: v.into() }
}

fn criu_version() -> Option<w::CriuVersion> {
    Some(w::CriuVersion { major: 4, minor: 2, sublevel: 0, text: "Version: 4.2".into() })
}

fn restore_stats() -> Option<w::RestoreStats> {
    Some(w::RestoreStats {
        pages_compared: 0,
        pages_skipped_cow: 12,
        pages_restored: 65536,
        forking_time_us: 1800,
        restore_time_us: 41000,
    })
}

/// One message of every kind, with the contents a real migration gives them, in the order of a live migration.
pub fn messages() -> Vec<(&'static str, Body)> {
    vec![
        (
            "hello",
            Body::Hello(w::Hello {
                protocol_version: PROTOCOL_VERSION,
                phaul_version: "0.1.0".into(),
                criu: criu_version(),
                session: SESSION.into(),
                skip_criu_check: false,
                timeout_ms: 0,
            }),
        ),
        (
            "hello-reply",
            Body::HelloReply(w::HelloReply {
                protocol_version: PROTOCOL_VERSION,
                phaul_version: "0.1.0".into(),
                criu: criu_version(),
                features: Vec::new(),
                timeout_ms: 0,
            }),
        ),
        ("cpu-check", Body::CpuCheck(w::CpuCheck { cpuinfo_image: cpuinfo_like() })),
        ("cpu-check-reply", Body::CpuCheckReply(w::CpuCheckReply {})),
        (
            "setup",
            Body::Setup(w::Setup {
                htype: "pid".into(),
                id: "4242".into(),
                mode: w::Mode::Live as i32,
                htype_options: vec![kv("tcp-established", "true"), kv("shell-job", "false")],
                fs_driver: "external".into(),
                fs_options: vec![kv("msg-fd", "5"), kv("timeout", "600")],
                fs_roots: vec!["/srv/app".into(), "/var/lib/app".into()],
                keep_images: false,
                has_fs_channel: true,
                dst_rpid: "/run/restored.pid".into(),
                post_copy: false,
                lazy_restore: false,
                handover: w::Handover::Overlap as i32,
                max_frozen_ms: 60_000,
                expected_image_bytes: 64 << 20,
            }),
        ),
        (
            "preflight",
            Body::Preflight(w::Preflight {
                htype: "lxc".into(),
                fs_driver: "rsync".into(),
                mode: w::Mode::Live as i32,
                pre_copy: true,
                lazy: false,
                expected_image_bytes: 256 << 20,
                source_criu: Some(w::CriuVersion { major: 4, minor: 2, sublevel: 1, text: String::new() }),
                cpuinfo_image: cpuinfo_like(),
                tcp: true,
            }),
        ),
        (
            "preflight-reply",
            Body::PreflightReply(w::PreflightReply {
                checks: vec![w::CheckResult { name: "cpu".into(), level: 2, message: "lacks avx512".into() }],
            }),
        ),
        ("setup-reply", Body::SetupReply(w::SetupReply { image_dir: format!("/var/lib/phaul/images/{SESSION}") })),
        (
            "start-round",
            Body::StartRound(w::StartRound { round: 1, r#final: false, lazy: false, pages_as_files: false }),
        ),
        ("start-round-reply", Body::StartRoundReply(w::StartRoundReply {})),
        ("end-round", Body::EndRound(w::EndRound { round: 1, want_pagemaps: true })),
        (
            "end-round-reply",
            Body::EndRoundReply(w::EndRoundReply {
                page_server_bytes: 268_435_456,
                pagemaps: vec![w::ImageFile { name: "pagemap-4242.img".into(), data: stats_image_like() }],
                page_files: vec!["pages-1.img".into()],
            }),
        ),
        ("fs-round-done", Body::FsRoundDone(w::FsRoundDone { round: 2, r#final: true })),
        ("fs-round-reply", Body::FsRoundReply(w::FsRoundReply { bytes: 1 << 20, files: 17 })),
        (
            "files",
            Body::Files(w::Files {
                round: 2,
                target: w::files::Target::Images as i32,
                files: vec![
                    w::FileHeader { name: "core-4242.img".into(), size: 2812 },
                    w::FileHeader { name: "files.img".into(), size: 1961 },
                    w::FileHeader { name: "inventory.img".into(), size: 86 },
                ],
            }),
        ),
        ("files-reply", Body::FilesReply(w::FilesReply { bytes: 4859 })),
        ("restore", Body::Restore(w::Restore { round: 2, lazy: false })),
        (
            "restore-reply",
            Body::RestoreReply(w::RestoreReply {
                pid: 4242,
                stats: restore_stats(),
                restore_wall_us: 52_000,
                held: true,
            }),
        ),
        ("commit", Body::Commit(w::Commit {})),
        ("committed", Body::Committed(w::Committed { pid: 4242, resume_wall_us: 900, stats: restore_stats() })),
        ("start", Body::Start(w::Start {})),
        ("start-reply", Body::StartReply(w::StartReply { pid: 4243 })),
        ("finish", Body::Finish(w::Finish { migrated: true, reason: String::new() })),
        (
            "finish-reply",
            Body::FinishReply(w::FinishReply { kept_images: "/var/lib/phaul/images/x".into(), last_page_ms: 0 }),
        ),
        (
            "failure",
            Body::Failure(w::Failure {
                message: "the destination's disk is full at /var/lib/phaul/images".into(),
                criu_errors: vec!["Error (criu/page-xfer.c:1234): page-xfer: Can't write: No space left".into()],
                aborted: true,
            }),
        ),
        (
            "channel-open-memory",
            Body::ChannelOpen(w::ChannelOpen { session: SESSION.into(), kind: w::ChannelKind::ChannelMemory as i32 }),
        ),
        (
            "channel-open-fs",
            Body::ChannelOpen(w::ChannelOpen { session: SESSION.into(), kind: w::ChannelKind::ChannelFs as i32 }),
        ),
        ("resolve", Body::Resolve(w::Resolve { session: SESSION.into(), decision: w::Decision::Commit as i32 })),
        (
            "resolve-reply",
            Body::ResolveReply(w::ResolveReply {
                state: w::SessionState::StateCommitted as i32,
                pid: 4242,
                detail: "the copy runs here".into(),
            }),
        ),
    ]
}

/// Something the size and shape of a cpuinfo.img (a common magic, its magic, one entry).
fn cpuinfo_like() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    v.extend_from_slice(&0x6140_4013u32.to_le_bytes());
    let entry: Vec<u8> = (0..200u8).collect();
    v.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    v.extend_from_slice(&entry);
    v
}

fn stats_image_like() -> Vec<u8> {
    image(&[IMG_COMMON_MAGIC, 0x5644_1526], &[vec![8, 1], vec![8, 0x80, 0x80, 4, 16, 32]])
}

/// An envelope's encoding (a frame's payload).
pub fn payload(body: &Body) -> Vec<u8> {
    Envelope { body: Some(body.clone()) }.encode_to_vec()
}

/// A frame: the 4-byte big-endian length, then the payload.
pub fn frame(body: &Body) -> Vec<u8> {
    let p = payload(body);
    let mut f = (p.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&p);
    f
}

/// A CRIU image: its magic words (little-endian), then each entry as its 32-bit little-endian size and bytes.
pub fn image(magics: &[u32], entries: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    for m in magics {
        v.extend_from_slice(&m.to_le_bytes());
    }
    for e in entries {
        v.extend_from_slice(&(e.len() as u32).to_le_bytes());
        v.extend_from_slice(e);
    }
    v
}

fn external(t: ExternalType, message: &str, round: u32, frozen: bool) -> Vec<u8> {
    let m = ExternalMessage { r#type: t as i32, message: message.into(), round, frozen, session: SESSION.into() };
    let mut out = Vec::new();
    phaul_fs_external::write_message(&mut out, &m).expect("writing to a Vec");
    out
}

fn tty_info(id: u32, packet_mode: bool) -> TtyInfoEntry {
    // /dev/pts/N is major 136, minor N; a master opened through /dev/ptmx is 5:2.
    let index = id >> 1;
    let rdev = if id & 1 == 1 { (5 << 8) | 2 } else { (136 << 8) | index };
    TtyInfoEntry {
        id,
        r#type: TtyType::Pty as i32,
        packet_mode,
        rdev,
        pty: Some(TtyPtyEntry { index }),
        dev: Some(0x16),
    }
}

fn tty_file(id: u32, tty_info_id: u32, flags: u32) -> FileEntry {
    FileEntry { r#type: FdTypes::Tty as i32, id, tty: Some(TtyFileEntry { id, tty_info_id, flags }) }
}

/// One btrfs send-stream command: its number and its attributes (type, value).
type SendCommand = (u16, Vec<(u16, Vec<u8>)>);

/// A btrfs send stream (version 1) of `cmds` (command, attributes), with the `btrfs_stream` target's two
/// leading bytes: whether a parent exists and the piece size.
fn btrfs_stream(parent: bool, piece: u8, cmds: &[SendCommand]) -> Vec<u8> {
    let mut out = vec![u8::from(parent), piece];
    out.extend_from_slice(b"btrfs-stream\0");
    out.extend_from_slice(&1u32.to_le_bytes());
    for (c, attrs) in cmds {
        let mut payload = Vec::new();
        for (t, v) in attrs {
            payload.extend_from_slice(&t.to_le_bytes());
            payload.extend_from_slice(&(v.len() as u16).to_le_bytes());
            payload.extend_from_slice(v);
        }
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&payload);
    }
    out
}

/// Every generated seed.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        seeds.push(Seed { target, name: name.to_string(), bytes });
    };

    let msgs = messages();
    for (name, body) in &msgs {
        add("wire_envelope", name, payload(body));
        add("wire_stream", name, frame(body));
    }
    add("wire_envelope", "bad-empty-envelope", Vec::new());
    // A whole live migration as the destination reads it, and as the source reads it.
    let conversation = |pick: fn(&str) -> bool| -> Vec<u8> {
        msgs.iter().filter(|(n, _)| pick(n)).flat_map(|(_, b)| frame(b)).collect()
    };
    add("wire_stream", "destination-reads", conversation(|n| !n.ends_with("reply") && !n.starts_with("fail")));
    add("wire_stream", "source-reads", conversation(|n| n.ends_with("reply") || n == "committed"));
    let mut cut = frame(&msgs[0].1);
    cut.truncate(cut.len() - 3);
    add("wire_stream", "bad-frame-cut-short", cut);
    add("wire_stream", "bad-frame-over-limit", (phaul_core::wire::MAX_FRAME + 1).to_be_bytes().to_vec());

    for (name, body) in &msgs {
        if matches!(body, Body::ChannelOpen(_) | Body::Hello(_) | Body::Resolve(_)) {
            add("channel_open", name, frame(body));
        }
    }
    let bad = |session: &str, kind: w::ChannelKind| {
        frame(&Body::ChannelOpen(w::ChannelOpen { session: session.into(), kind: kind as i32 }))
    };
    add("channel_open", "bad-session-path", bad("../../etc/passwd", w::ChannelKind::ChannelMemory));
    add("channel_open", "bad-session-uppercase", bad("3F2A9C0D5E8B47A1B6C4D2E0F9A8B7C6", w::ChannelKind::ChannelFs));
    add("channel_open", "bad-kind-unspecified", bad(SESSION, w::ChannelKind::ChannelUnspecified));
    add("channel_open", "bad-first-frame-commit", frame(&Body::Commit(w::Commit {})));

    add("fs_external", "sync-fs", external(ExternalType::SyncFs, "", 1, false));
    add("fs_external", "success", external(ExternalType::Success, "", 1, false));
    add("fs_external", "error", external(ExternalType::Error, "zfs send failed: dataset is busy", 2, true));
    add("fs_external", "unsupported", external(ExternalType::Unsupported, "no storage backend for /srv", 0, false));
    let mut two = external(ExternalType::SyncFs, "", 2, true);
    two.extend(external(ExternalType::Success, "", 2, true));
    add("fs_external", "sync-then-success", two);
    add("fs_external", "bad-too-large", (2u32 << 20).to_be_bytes().to_vec());

    let repo_plugins = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins.toml"))
        .expect("reading the repository's plugins.toml");
    add("plugins_toml", "repository-plugins.toml", repo_plugins);

    // btrfs send streams (protocol facts: command 1 SUBVOL, 2 SNAPSHOT, 3 MKFILE, 9 RENAME, 15 WRITE, 16 CLONE,
    // 21 END; attribute 1 UUID, 15 PATH, 16 PATH_TO, 18 FILE_OFFSET, 19 DATA, 20 CLONE_UUID, 22 CLONE_PATH).
    let own = vec![7u8; 16];
    let parent = crate::BTRFS_PARENT.to_vec();
    let subvol = (1u16, vec![(15u16, b"snap".to_vec()), (1, own.clone())]);
    let snapshot = (2u16, vec![(15u16, b"snap2".to_vec()), (1, own.clone()), (20, parent.clone())]);
    let mkfile = (3u16, vec![(15u16, b"dir/file".to_vec())]);
    let write = (15u16, vec![(15u16, b"dir/file".to_vec()), (18, 0u64.to_le_bytes().to_vec()), (19, b"data".to_vec())]);
    let clone = (16u16, vec![(15u16, b"b".to_vec()), (20, parent.clone()), (22, b"a".to_vec())]);
    let end = (21u16, vec![]);
    add("btrfs_stream", "full", btrfs_stream(false, 6, &[subvol.clone(), mkfile.clone(), write, end.clone()]));
    add("btrfs_stream", "incremental", btrfs_stream(true, 255, &[snapshot.clone(), clone, end.clone()]));
    let escape = (9u16, vec![(15u16, b"a".to_vec()), (16, b"../S".to_vec())]);
    add("btrfs_stream", "bad-dotdot", btrfs_stream(false, 0, &[subvol.clone(), escape, end.clone()]));
    let foreign = (16u16, vec![(15u16, b"b".to_vec()), (20, vec![1; 16]), (22, b"x".to_vec())]);
    add("btrfs_stream", "bad-foreign-clone", btrfs_stream(true, 3, &[snapshot, foreign, end.clone()]));
    add("btrfs_stream", "bad-before-subvolume", btrfs_stream(false, 16, &[mkfile, subvol, end]));
    // zfs send begin records (protocol facts: u32 type 0 BEGIN, u32 payload length, u64 magic 0x2F5BACBAC at 8,
    // u64 version info at 16 (low bits 1 single, 2 compound), u32 object set type 2 (ZFS) at 32, u32 flags at 36
    // (bit 0 clone), u64 to-GUID at 40, u64 from-GUID at 48, the snapshot's name at 56, 312 bytes in all).
    let begin = |big: bool, version: u64, flags: u32, from: u64, name: &str| {
        let mut r = vec![0u8; 312];
        let w64 = |v: u64| if big { v.to_be_bytes() } else { v.to_le_bytes() };
        let w32 = |v: u32| if big { v.to_be_bytes() } else { v.to_le_bytes() };
        r[8..16].copy_from_slice(&w64(0x2_F5BA_CBAC));
        r[16..24].copy_from_slice(&w64(version));
        r[32..36].copy_from_slice(&w32(2));
        r[36..40].copy_from_slice(&w32(flags));
        r[40..48].copy_from_slice(&w64(0xabcdef));
        r[48..56].copy_from_slice(&w64(from));
        r[56..56 + name.len()].copy_from_slice(name.as_bytes());
        r
    };
    let zfs = |base: bool, piece: u8, rec: Vec<u8>| {
        let mut v = vec![u8::from(base), piece];
        v.extend(rec);
        v.extend_from_slice(b"...records that follow the begin record...");
        v
    };
    add("zfs_begin", "full", zfs(false, 40, begin(false, 1, 0, 0, "tank/ct@phaul-1-ab-2-r1")));
    add("zfs_begin", "incremental-big-endian", zfs(true, 255, begin(true, 1, 0, crate::ZFS_BASE, "tank/ct@r2")));
    add("zfs_begin", "bad-compound", zfs(false, 7, begin(false, 2, 0, 0, "tank/ct@r1")));
    add("zfs_begin", "bad-clone", zfs(false, 0, begin(false, 1, 1, 0, "tank/ct@r1")));
    add("zfs_begin", "bad-other-base", zfs(true, 100, begin(false, 1, 0, 77, "tank/ct@r2")));
    let packaged = concat!(
        "[[plugin]]\n",
        "path = \"/usr/lib/phaul/plugins/libphaul_htype_pid.so\"\n\n",
        "[[plugin]]\n",
        "path = \"libphaul_fs_shared.so\"\n",
        "enabled = true\n\n",
        "[[plugin]]\n",
        "path = 'libphaul_fs_external.so'\n",
        "enabled = false\n\n",
        "[host-type.pid]\n",
        "fs = \"shared\"\n\n",
        "[host-type.\"lxc\"]\n",
        "fs = \"external\"\n",
    );
    add("plugins_toml", "packaged.toml", packaged.as_bytes().to_vec());
    let inline = concat!(
        "plugin = [{ path = \"a.so\" }, { path = \"b.so\", enabled = false }]\n",
        "host-type = { pid = { fs = \"shared\" } }\n",
    );
    add("plugins_toml", "inline.toml", inline.as_bytes().to_vec());
    add("plugins_toml", "empty.toml", Vec::new());
    add("plugins_toml", "bad-enabled-maybe.toml", b"[[plugin]]\npath = \"x.so\"\nenabled = maybe\n".to_vec());
    add("plugins_toml", "bad-unknown-key.toml", b"[[plugin]]\nfile = \"x.so\"\n".to_vec());

    let dump = StatsEntry {
        dump: Some(DumpStatsEntry {
            freezing_time: 1510,
            frozen_time: 184_000,
            memdump_time: 9800,
            memwrite_time: 150_000,
            pages_scanned: 72_000,
            pages_skipped_parent: 3,
            pages_written: 65_600,
            irmap_resolve: Some(0),
            pages_lazy: 0,
            page_pipes: Some(2),
            page_pipe_bufs: Some(9),
            shpages_scanned: Some(0),
            shpages_skipped_parent: Some(0),
            shpages_written: Some(0),
        }),
        restore: None,
    };
    let restore = StatsEntry {
        dump: None,
        restore: Some(RestoreStatsEntry {
            pages_compared: 0,
            pages_skipped_cow: 12,
            forking_time: 1800,
            restore_time: 41_000,
            pages_restored: Some(65_600),
        }),
    };
    add("image_stats", "stats-dump", image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &[dump.encode_to_vec()]));
    add("image_stats", "stats-restore", image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &[restore.encode_to_vec()]));
    add("image_stats", "bad-inventory", image(&[0x5831_3116], &[vec![8, 2]]));
    add("image_stats", "bad-truncated", {
        let mut v = image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &[dump.encode_to_vec()]);
        v.truncate(v.len() - 5);
        v
    });

    // A pty pair (index 3) both of whose ends the tree held, with data queued both ways, and the open files.
    let (master, slave) = (3 << 1 | 1, 3 << 1);
    let infos = image(
        &[IMG_COMMON_MAGIC, TTY_INFO_MAGIC],
        &[tty_info(master, false).encode_to_vec(), tty_info(slave, false).encode_to_vec()],
    );
    let data = image(
        &[IMG_COMMON_MAGIC, TTY_DATA_MAGIC],
        &[
            TtyDataEntry { tty_id: master, data: b"ls -l\n".to_vec() }.encode_to_vec(),
            TtyDataEntry { tty_id: slave, data: b"total 0\r\n".to_vec() }.encode_to_vec(),
        ],
    );
    let files = image(
        &[IMG_COMMON_MAGIC, FILES_MAGIC],
        &[
            tty_file(1, master, 0o2).encode_to_vec(),
            tty_file(2, slave, 0o2 | 0o4000).encode_to_vec(),
            FileEntry { r#type: FdTypes::Und as i32, id: 3, tty: None }.encode_to_vec(),
        ],
    );
    add("image_tty", "bad-pty-pair-with-data", crate::join_tty_input([Some(&data), Some(&infos), Some(&files)]));
    add("image_tty", "pty-pair-no-data", crate::join_tty_input([None, Some(&infos), Some(&files)]));
    add("image_tty", "no-tty-images", crate::join_tty_input([None, None, Some(&files)]));
    let packet = image(&[IMG_COMMON_MAGIC, TTY_INFO_MAGIC], &[tty_info(master, true).encode_to_vec()]);
    add("image_tty", "bad-master-without-its-slave", crate::join_tty_input([Some(&data), Some(&packet), None]));

    seeds
}

/// Seeds made of the images of a real CRIU dump in `dir` (what `fuzz/criu-seeds` produces): its stats-dump,
/// stats-restore and terminal images, those that exist.
pub fn from_criu_dump(dir: &Path) -> Vec<Seed> {
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    let mut seeds = Vec::new();
    for name in ["stats-dump", "stats-restore"] {
        if let Some(bytes) = read(name) {
            seeds.push(Seed { target: "image_stats", name: format!("criu-{name}"), bytes });
        }
    }
    let [d, i, f] = crate::TTY_FILES.map(read);
    if d.is_some() || i.is_some() {
        // With no process to hold the pty, the write-back refuses to put the data anywhere.
        let bytes = crate::join_tty_input([d.as_deref(), i.as_deref(), f.as_deref()]);
        seeds.push(Seed { target: "image_tty", name: "bad-criu-pty-pair".into(), bytes });
    }
    if let Some(cpuinfo) = read("cpuinfo.img") {
        let body = Body::CpuCheck(w::CpuCheck { cpuinfo_image: cpuinfo });
        seeds.push(Seed { target: "wire_envelope", name: "criu-cpu-check".into(), bytes: payload(&body) });
        seeds.push(Seed { target: "wire_stream", name: "criu-cpu-check".into(), bytes: frame(&body) });
    }
    seeds
}
