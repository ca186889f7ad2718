//! Config parsing and validation: defaults, ranges, relations, errors naming fields.

use super::*;
use crate::sys::socket::SocketGroup;
use crate::sys::yaml::{assert_no_key, TEST_KEYS};

const MIN: &str = "path: /tmp/disk.raw\nsocket: /tmp/vhost.sock\n";

fn err_of(text: &str) -> String {
    Options::parse(text).unwrap_err().to_string()
}

#[test]
fn minimal_config_gets_defaults() {
    let o = Options::parse(MIN).unwrap();
    assert_eq!(o.path, PathBuf::from("/tmp/disk.raw"));
    assert_eq!(o.num_queues, 1);
    assert_eq!(o.queue_size, 256);
    assert_eq!(o.device_id, "ubiblk");
    assert!(!o.readonly && !o.skip_sync && !o.copy_on_read);
    assert!(o.image_path.is_none() && o.encryption_key.is_none());
}

#[test]
fn seed_example_parses() {
    let text = r#"
path: "/path/to/block-device.raw"
image_path: "/path/to/ubi-image.raw"
metadata_path: "/path/to/metadata"
socket: "/tmp/vhost.sock"
num_queues: 4
queue_size: 256
seg_size_max: 4096
seg_count_max: 1
poll_queue_timeout_us: 500
io_debug_path: "/tmp/io_debug.log"
skip_sync: false
copy_on_read: false
device_id: "ubiblk"
encryption_key:
  - "x74Yhe/ovgxY4BrBaM6Wm/9firf9k/N+ayvGsskBo+hjQtrL+nslCDC5oR/HpSDL"
  - "TJn65Jb//AYqu/a8zlpb0IlXC4vwFQ5DtbQkMTeliEAwafr0DEH+5hNro8FuVzQ+"
"#;
    let o = Options::parse(text).unwrap();
    assert_eq!(o.num_queues, 4);
    assert_eq!(o.seg_size_max, 4096);
    assert_eq!(o.poll_queue_timeout_us, 500);
    assert_eq!(o.encryption_key.as_ref().unwrap().len(), 2);
    assert_eq!(o.io_debug_path, Some(PathBuf::from("/tmp/io_debug.log")));
}

#[test]
fn unknown_field_is_named() {
    let e = err_of(&format!("{MIN}num_queus: 2\n"));
    assert!(e.contains("num_queus"), "{e}");
}

#[test]
fn v02_and_legacy_fields_are_accepted() {
    let o = Options::parse(MIN).unwrap();
    assert!(o.cpus.is_none() && !o.write_through && o.track_written.is_none());
    assert!(o.ignored_fields().is_empty());
    let o = Options::parse(&format!(
        "{MIN}num_queues: 2\ncpus: [1, 0]\nwrite_through: true\ntrack_written: false\n\
         direct_io: true\n"
    ))
    .unwrap();
    assert_eq!(o.cpus, Some(vec![1, 0]));
    assert!(o.write_through);
    let ignored: Vec<&str> = o.ignored_fields().iter().map(|(f, _)| *f).collect();
    assert_eq!(ignored, ["direct_io", "track_written"]);
    let o = Options::parse(&format!("{MIN}track_written: true\n")).unwrap();
    assert!(o.ignored_fields().is_empty());
}

#[test]
fn cpus_needs_one_cpu_per_queue() {
    for (extra, want) in [
        ("num_queues: 2\ncpus: [0]", "one per queue (num_queues: 2)"),
        ("cpus: [0, 1]", "one per queue (num_queues: 1)"),
        ("cpus: [4096]", "out of range"),
        ("cpus: [-1]", "cpus"),
    ] {
        let e = err_of(&format!("{MIN}{extra}\n"));
        assert!(e.contains("cpus") && e.contains(want), "{extra}: {e}");
    }
}

#[test]
fn refused_legacy_field_says_so_and_typos_do_not() {
    let e = err_of(&format!("{MIN}sync_io: true\n"));
    assert!(e.contains("unknown field `sync_io`"), "{e}");
    assert!(
        e.contains("legacy field") && e.contains("write_through"),
        "{e}"
    );
    let e = err_of(&format!("{MIN}direct_iox: true\n"));
    assert!(
        e.contains("unknown field `direct_iox`") && !e.contains("legacy"),
        "{e}"
    );
}

#[test]
fn wrong_type_is_named() {
    let e = err_of(&format!("{MIN}num_queues: two\n"));
    assert!(e.contains("num_queues"), "{e}");
    let e = err_of(&format!("{MIN}skip_sync: 3\n"));
    assert!(e.contains("skip_sync"), "{e}");
}

#[test]
fn missing_required_field_is_named() {
    let e = err_of("path: /tmp/d\n");
    assert!(e.contains("socket"), "{e}");
}

#[test]
fn range_checks_name_the_field() {
    for (extra, field) in [
        ("num_queues: 0", "num_queues"),
        ("queue_size: 100", "queue_size"),
        ("queue_size: 0", "queue_size"),
        ("seg_size_max: 1000", "seg_size_max"),
        ("seg_count_max: 0", "seg_count_max"),
        ("device_id: \"123456789012345678901\"", "device_id"),
        ("image_path: /tmp/img", "metadata_path"),
        ("metadata_path: /tmp/meta", "metadata_path"),
        ("copy_on_read: true", "copy_on_read"),
        ("encryption_key: [\"a\"]", "encryption_key"),
        ("num_queues: -1", "num_queues"),
        ("queue_size: 70000", "queue_size"),
        ("autofetch: true", "autofetch"),
        ("control_socket: \"\"", "control_socket"),
        (
            "image_path: /i\nmetadata_path: /m\nautofetch_mib_per_sec: 5",
            "autofetch_mib_per_sec",
        ),
        (
            "image_path: /i\nmetadata_path: /m\nautofetch: true\nautofetch_mib_per_sec: 0",
            "autofetch_mib_per_sec",
        ),
        (
            "image_path: /i\nmetadata_path: /m\nreadonly: true",
            "readonly",
        ),
        (
            "image_path: /i\nmetadata_path: /m\ncontrol_socket: /tmp/vhost.sock",
            "control_socket",
        ),
    ] {
        let e = err_of(&format!("{MIN}{extra}\n"));
        assert!(e.contains(field), "{extra}: {e}");
    }
}

#[test]
fn garbage_does_not_panic() {
    for text in ["", "[", "- a\n- b", "path: [1, 2]", "\u{0}\u{1}", "a: b: c"] {
        assert!(Options::parse(text).is_err(), "{text:?}");
    }
}

#[test]
fn remote_sources_and_their_fields() {
    let m = "metadata_path: /m\n";
    for ok in [
        "image_url: http://127.0.0.1:8080/img.raw",
        "image_url: https://images.example/img.raw?X-Amz-Signature=abc",
        "image_url: s3://bucket/key/img.raw",
        "archive_url: s3://bucket/prefix",
        "archive_url: file:///var/lib/archives/disk1",
    ] {
        let o = Options::parse(&format!("{MIN}{m}{ok}\n")).unwrap();
        assert!(o.lazy_source_field().is_some(), "{ok}");
    }
    let o = Options::parse(&format!(
        "{MIN}{m}image_url: s3://b/k\nfetch_connections: 32\nfetch_timeout_secs: 5\n\
         fetch_retry_secs: 0\ns3_endpoint: http://127.0.0.1:3900\ns3_region: garage\n\
         s3_profile: test\n"
    ))
    .unwrap();
    assert_eq!(o.fetch_connections, Some(32));
    assert_eq!(o.fetch_retry_secs, Some(0));
    let cases = [
        (
            "image_url: ftp://h/x",
            "image_url",
            "must start with http://",
        ),
        ("image_url: http://", "image_url", "no host"),
        (
            "image_url: http://u:secret@h/x",
            "image_url",
            "user name or password",
        ),
        (
            "archive_url: http://h/x",
            "archive_url",
            "must start with s3://",
        ),
        (
            "image_url: s3://b/k\nimage_path: /i",
            "image_url",
            "cannot be combined with image_path",
        ),
        (
            "image_url: s3://b/k\nfetch_connections: 0",
            "fetch_connections",
            "1..=256",
        ),
        (
            "image_url: s3://b/k\nfetch_connections: 257",
            "fetch_connections",
            "1..=256",
        ),
        (
            "image_url: s3://b/k\nfetch_timeout_secs: 0",
            "fetch_timeout_secs",
            "1..=3600",
        ),
        (
            "image_url: s3://b/k\ns3_region: ' '",
            "s3_region",
            "must not be empty",
        ),
        (
            "image_url: s3://b/k\ns3_endpoint: s3.example",
            "s3_endpoint",
            "http://",
        ),
        (
            "image_path: /i\nfetch_retry_secs: 5",
            "fetch_retry_secs",
            "remote source",
        ),
        (
            "image_path: /i\ns3_profile: p",
            "s3_profile",
            "remote source",
        ),
    ];
    for (yaml, field, want) in cases {
        let e = err_of(&format!("{MIN}{m}{yaml}\n"));
        assert!(e.contains(field) && e.contains(want), "{yaml}: {e}");
        assert!(!e.contains("secret"), "{yaml}: {e}");
    }
    let e = err_of(&format!("{MIN}image_url: s3://b/k\n"));
    assert!(
        e.contains("metadata_path") && e.contains("image_url"),
        "{e}"
    );
    let e = err_of(&format!("{MIN}fetch_connections: 4\n"));
    assert!(
        e.contains("needs image_path, image_url or archive_url"),
        "{e}"
    );
}

#[test]
fn lazy_fields_without_image_path_are_refused_not_ignored() {
    for field in [
        "metadata_path: /tmp/meta",
        "copy_on_read: true",
        "autofetch: true",
    ] {
        let e = err_of(&format!("{MIN}{field}\n"));
        assert!(e.contains("needs image_path"), "{field}: {e}");
    }
    // The defaults, spelled out, are fine.
    Options::parse(&format!("{MIN}copy_on_read: false\nautofetch: false\n")).unwrap();
    let lazy = "image_path: /i\nmetadata_path: /m\ncopy_on_read: true\n";
    Options::parse(&format!("{MIN}{lazy}")).unwrap();
}

#[test]
fn out_of_range_integers_give_the_allowed_range() {
    let lazy = "image_path: /i\nmetadata_path: /m\nautofetch: true\n";
    for (extra, want) in [
        (
            "num_queues: 100000",
            "`num_queues`: must be in 1..=64 (line 6, column 13)",
        ),
        ("num_queues: 65", "`num_queues`: must be in 1..=64"),
        ("num_queues: -1", "`num_queues`: must be in 1..=64"),
        ("num_queues: 0", "`num_queues`: must be in 1..=64"),
        (
            "num_queues: 100000000000000000000000",
            "`num_queues`: must be in 1..=64",
        ),
        (
            "num_queues: 1.5",
            "`num_queues`: expected an integer in 1..=64",
        ),
        ("queue_size: 70000", "`queue_size`: must be in 1..=32768"),
        (
            "seg_size_max: 256",
            "`seg_size_max`: must be in 512..=33554432",
        ),
        (
            "seg_count_max: 40000",
            "`seg_count_max`: must be in 1..=32768",
        ),
        (
            "poll_queue_timeout_us: 2000000",
            "`poll_queue_timeout_us`: must be in 0..=1000000",
        ),
        (
            "autofetch_mib_per_sec: 5000000000",
            "`autofetch_mib_per_sec`: must be in 1..=4294967295",
        ),
    ] {
        let e = err_of(&format!("{MIN}{lazy}{extra}\n"));
        assert!(e.contains(want), "{extra}: {e}");
    }
    let o = Options::parse(&format!(
        "{MIN}{lazy}num_queues: 64\npoll_queue_timeout_us: 0\nautofetch_mib_per_sec: ~\n"
    ))
    .unwrap();
    assert_eq!((o.num_queues, o.poll_queue_timeout_us), (64, 0));
    assert_eq!(o.autofetch_mib_per_sec, None);
}

const KEY32: &str = TEST_KEYS[0];
const KEY48: &str = TEST_KEYS[1];

#[test]
fn parse_errors_never_repeat_a_key() {
    for (extra, field) in [
        (format!("encryption_key: {KEY32}"), "`encryption_key`"),
        (format!("encryption_key: \"{KEY48}\""), "`encryption_key`"),
        (
            format!("encryption_key: {{{KEY32}: {KEY48}}}"),
            "`encryption_key`",
        ),
        (
            format!("encryption_key: [[{KEY32}], {KEY48}]"),
            "`encryption_key[0]`",
        ),
        (
            format!("encryption_key: [{KEY32}, [{KEY48}]]"),
            "`encryption_key[1]`",
        ),
        (format!("encryption_key:\n  {KEY32}: 1"), "`encryption_key`"),
        (format!("num_queues: {KEY32}"), "`num_queues`"),
        (format!("skip_sync: {KEY48}"), "`skip_sync`"),
        (format!("{KEY32}: 1"), "unknown field"),
        (KEY48.to_string(), "expected a mapping"),
        (format!("encryption_key: [\"{KEY32}"), "not valid YAML"),
        (
            format!("encryption_key: [a, b]\nencryption_key: [{KEY32}, {KEY48}]"),
            "duplicate field `encryption_key`",
        ),
    ] {
        let text = if extra.starts_with(KEY48) {
            extra.clone()
        } else {
            format!("{MIN}{extra}\n")
        };
        let e = err_of(&text);
        assert_no_key(&e);
        assert!(e.contains(field), "{extra}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn debug_does_not_print_the_keys() {
    let o = Options::parse(&format!("{MIN}encryption_key: [{KEY32}, {KEY48}]\n")).unwrap();
    let text = format!("{o:?}");
    assert_no_key(&text);
    assert!(text.contains("2 entries"), "{text}");
    assert_eq!(o.encryption_key.as_deref().map(<[String]>::len), Some(2));
}

/// FIELDS (which names error messages may repeat) is every field serde knows.
#[test]
fn fields_lists_every_field() {
    let e = serde_yaml_ng::from_str::<Options>(&format!("{MIN}zz: 1\n")).unwrap_err();
    let e = e.to_string();
    let list = e.split("expected one of ").nth(1).unwrap();
    let list = list.split(" at line").next().unwrap();
    let names: Vec<&str> = list.split(", ").map(|n| n.trim_matches('`')).collect();
    assert_eq!(names, FIELDS);
}

fn files_config(dir: &Path, extra: &str) -> Options {
    let d = dir.display();
    let lazy = format!("image_path: {d}/image\nmetadata_path: {d}/meta\n");
    Options::parse(&format!(
        "path: {d}/disk\nsocket: {d}/vhost.sock\n{lazy}{extra}"
    ))
    .unwrap()
}

#[test]
fn files_must_be_distinct_as_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = p.display();
    for name in ["disk", "image", "meta"] {
        std::fs::write(p.join(name), b"x").unwrap();
    }
    std::fs::hard_link(p.join("disk"), p.join("disk.link")).unwrap();
    std::os::unix::fs::symlink(p.join("meta"), p.join("meta.sym")).unwrap();
    std::os::unix::fs::symlink(p.join("new.log"), p.join("log.sym")).unwrap();
    std::fs::create_dir(p.join("sub")).unwrap();

    files_config(
        p,
        &format!("io_debug_path: {d}/io.log\ncontrol_socket: {d}/ctl.sock\n"),
    )
    .check_distinct_files()
    .unwrap();
    for (extra, want) in [
        (
            format!("io_debug_path: {d}/disk"),
            format!("io_debug_path: {d}/disk is the same file as path ({d}/disk)"),
        ),
        (
            format!("io_debug_path: {d}/disk.link"),
            "is the same file as path".to_string(),
        ),
        (
            format!("io_debug_path: {d}/meta.sym"),
            "io_debug_path: ".to_string()
                + &format!("{d}/meta.sym is the same file as metadata_path"),
        ),
        (
            format!("io_debug_path: {d}/image"),
            "is the same file as image_path".to_string(),
        ),
        // Neither exists yet: compared where they would be created.
        (
            format!("io_debug_path: {d}/sub/../vhost.sock"),
            "socket: ".to_string() + &format!("{d}/vhost.sock is the same file as io_debug_path"),
        ),
        (
            format!("io_debug_path: {d}/log.sym\ncontrol_socket: {d}/new.log"),
            "control_socket: ".to_string()
                + &format!("{d}/new.log is the same file as io_debug_path"),
        ),
        (
            format!("control_socket: {d}/disk"),
            "control_socket: ".to_string() + &format!("{d}/disk is the same file as path"),
        ),
    ] {
        let e = files_config(p, &format!("{extra}\n"))
            .check_distinct_files()
            .unwrap_err()
            .to_string();
        assert!(e.contains(&want), "{extra}: {e}");
    }
    let mut o = files_config(p, "");
    o.socket = p.join("meta");
    let e = o.check_distinct_files().unwrap_err().to_string();
    assert!(e.contains("socket: ") && e.contains("metadata_path"), "{e}");
}

#[test]
fn socket_mode_is_octal_and_private_by_default() {
    assert_eq!(Options::parse(MIN).unwrap().socket_mode().unwrap(), 0o600);
    for (value, mode) in [
        ("\"0660\"", 0o660),
        ("0660", 0o660),
        ("660", 0o660),
        ("\"0o640\"", 0o640),
        ("0o600", 0o600),
        ("\"0700\"", 0o700),
        ("\"0\"", 0),
    ] {
        let o = Options::parse(&format!("{MIN}socket_mode: {value}\n")).unwrap();
        assert_eq!(o.socket_mode().unwrap(), mode, "{value}");
    }
}

#[test]
fn bad_socket_modes_are_refused_with_the_field_named() {
    for (value, why) in [
        ("\"0666\"", "other users"),
        ("\"0662\"", "other users"),
        ("0601", "other users"),
        ("\"0777\"", "other users"),
        ("\"4660\"", "outside 0777"),
        ("\"1770\"", "outside 0777"),
        ("\"0680\"", "not an octal mode"),
        ("\"rw-rw----\"", "not an octal mode"),
        ("\"\"", "not an octal mode"),
        ("\"+660\"", "not an octal mode"),
        ("\"-660\"", "not an octal mode"),
        ("\"77777777777777\"", "outside 0777"),
        ("\"777777777777777777777777\"", "outside 0777"),
        ("\"0o10000\"", "outside 0777"),
        ("[1]", "socket_mode"),
    ] {
        let e = err_of(&format!("{MIN}socket_mode: {value}\n"));
        assert!(e.contains("socket_mode") && e.contains(why), "{value}: {e}");
    }
}

#[test]
fn socket_group_is_a_gid_or_a_name() {
    assert_eq!(Options::parse(MIN).unwrap().socket_group().unwrap(), None);
    for (value, group) in [
        ("0", SocketGroup::Id(0)),
        ("\"1000\"", SocketGroup::Id(1000)),
        ("4294967294", SocketGroup::Id(u32::MAX - 1)),
        ("kvm", SocketGroup::Name("kvm".into())),
        ("\"libvirt-qemu\"", SocketGroup::Name("libvirt-qemu".into())),
    ] {
        let o = Options::parse(&format!("{MIN}socket_group: {value}\n")).unwrap();
        assert_eq!(o.socket_group().unwrap(), Some(group), "{value}");
    }
    for value in [
        "\"\"",
        "4294967295",
        "99999999999",
        "\"a:b\"",
        "\"a\\0b\"",
        "{}",
    ] {
        let e = err_of(&format!("{MIN}socket_group: {value}\n"));
        assert!(e.contains("socket_group"), "{value}: {e}");
    }
}

#[test]
fn qos_limits_parse_with_qemu_names_and_rules() {
    let o = Options::parse(&format!(
        "{MIN}qos:\n  iops_total: 5000\n  iops_total_max: 6000\n  iops_total_max_length: 2\n  \
         bps_read: 52428800\n  bps_write: 0\n"
    ))
    .unwrap();
    let q = o.qos.unwrap();
    assert_eq!(
        (q.iops_total, q.iops_total_max, q.iops_total_max_length),
        (Some(5000), Some(6000), Some(2))
    );
    assert_eq!(q.normalized().bps_write, None);
    assert!(!q.is_unlimited());
    assert!(Options::parse(&format!("{MIN}qos: {{}}\n"))
        .unwrap()
        .qos
        .unwrap()
        .is_unlimited());
    for (yaml, want) in [
        ("iops_totl: 1", "unknown field `iops_totl`"),
        ("iops_total: -1", "`qos.iops_total`"),
        ("iops_total: x", "`qos.iops_total`"),
        (
            "iops_total_max: 10",
            "`qos.iops_total_max`: needs iops_total",
        ),
        (
            "iops_read: 10\n  iops_read_max: 5",
            "`qos.iops_read_max`: must not be lower than iops_read",
        ),
        (
            "iops_write: 10\n  iops_write_max_length: 5",
            "`qos.iops_write_max_length`: needs iops_write_max",
        ),
        (
            "iops_write: 10\n  iops_write_max: 20\n  iops_write_max_length: 0",
            "`qos.iops_write_max_length`: must be in 1..=86400",
        ),
        (
            "iops_total: 10\n  iops_write: 5",
            "`qos.iops_total`: cannot be combined with iops_write",
        ),
        (
            "bps_total: 1000\n  bps_total_max: 2000\n  bps_read_max: 4000\n  bps_read: 1000",
            "`qos.bps_total`: cannot be combined with bps_read",
        ),
        ("bps_read: 511", "`qos.bps_read`: must be at least 512"),
        (
            "bps_total: 1000000000000001",
            "`qos.bps_total`: must be at most",
        ),
    ] {
        let e = err_of(&format!("{MIN}qos:\n  {yaml}\n"));
        assert!(e.contains(want), "{yaml}: {e}");
    }
}

#[test]
fn device_id_of_20_bytes_is_accepted() {
    let o = Options::parse(&format!("{MIN}device_id: \"12345678901234567890\"\n")).unwrap();
    assert_eq!(o.device_id.len(), 20);
}

#[test]
fn stripe_server_and_the_ubiblk_source_need_a_psk_or_the_loud_opt_in() {
    let server = |s: &str| format!("{MIN}stripe_server: {s}\n");
    let o = Options::parse(&server(
        "{listen: \"0.0.0.0:4555\", psk_identity: host-b, psk_file: /etc/psk}",
    ))
    .unwrap();
    let s = o.stripe_server.unwrap();
    assert_eq!(
        (s.listen.as_str(), s.psk_identity.as_deref()),
        ("0.0.0.0:4555", Some("host-b"))
    );
    let e = err_of(&server("{listen: \"127.0.0.1:1\"}"));
    assert!(
        e.contains("stripe_server.psk_file`: is required") && e.contains("danger_zone"),
        "{e}"
    );
    let plain = format!(
        "{}danger_zone: {{enabled: true, allow_unencrypted_connection: true}}\n",
        server("{listen: \"[::1]:4555\"}")
    );
    assert!(Options::parse(&plain).unwrap().allows_plaintext());
    let half = format!(
        "{}danger_zone: {{allow_unencrypted_connection: true}}\n",
        server("{listen: \"[::1]:4555\"}")
    );
    assert!(err_of(&half).contains("danger_zone.allow_unencrypted_connection"));
    for bad in ["4555", "host:", "host:99999", ":80", "[::1:80"] {
        let e = err_of(&server(&format!(
            "{{listen: \"{bad}\", psk_identity: a, psk_file: /p}}"
        )));
        assert!(
            e.contains("stripe_server.listen`: must be HOST:PORT"),
            "{bad}: {e}"
        );
    }
    let e = err_of(&server(
        "{listen: \"h:1\", psk_identity: \"a b\", psk_file: /p}",
    ));
    assert!(e.contains("stripe_server.psk_identity"), "{e}");
    let e = err_of(&server("{listen: \"h:1\", psk_identity: a}"));
    assert!(
        e.contains("stripe_server.psk_file`: is required with psk_identity"),
        "{e}"
    );
    assert!(err_of(&server("{listen: \"h:1\", port: 3}")).contains("port"));

    let src = |extra: &str| {
        format!("{MIN}image_url: \"ubiblk://10.0.0.1:4555\"\nmetadata_path: /tmp/m\n{extra}")
    };
    let o = Options::parse(&src("psk_identity: host-b\npsk_file: /etc/psk\n")).unwrap();
    assert!(o.stripe_source());
    match o.lazy_options().unwrap().source {
        crate::lazy::source::SourceSpec::StripeServer { url, psk } => {
            assert_eq!(url, "ubiblk://10.0.0.1:4555");
            assert_eq!(psk.unwrap().identity, "host-b");
        }
        other => panic!("{other:?}"),
    }
    assert!(err_of(&src("")).contains("`psk_file`: is required"));
    let e = err_of(&format!(
        "{MIN}image_url: \"ubiblk://h:1/x\"\nmetadata_path: /m\n"
    ));
    assert!(e.contains("takes no path"), "{e}");
    let e = err_of(&format!("{MIN}psk_file: /p\npsk_identity: a\n"));
    assert!(e.contains("needs image_url: ubiblk://"), "{e}");
}
