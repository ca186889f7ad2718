//! `vhost-frontend` (our rust-vmm based vhost-user-blk frontend) against the real
//! `vhost-backend`: each stage on its own, and whole-disk copies.

use crate::common::*;
use base64::Engine;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BACKEND: &str = env!("CARGO_BIN_EXE_vhost-backend");
const FRONTEND: &str = env!("CARGO_BIN_EXE_vhost-frontend");

/// 5 MiB + 1536 bytes: not a multiple of 4 KiB (the last request is a 1.5 KiB one).
const ODD_SIZE: u64 = (5 << 20) + 1536;

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A temp dir (in /dev/shm when possible) with a pattern image of `size` bytes (any multiple
/// of 512) and a socket path.
fn setup(size: u64) -> Setup {
    let dir = scratch_dir("ubiblk-fe");
    let img = dir.path().join("disk.raw");
    let whole = size / 4096 * 4096;
    create_pattern_file(&img, whole).unwrap();
    if size > whole {
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&pattern_bytes(whole, (size - whole) as usize), whole)
            .unwrap();
    }
    let sock = dir.path().join("vhost.sock");
    Setup { dir, img, sock }
}

fn frontend(args: &[&str]) -> Output {
    Command::new(FRONTEND)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("cannot run vhost-frontend")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs vhost-frontend and requires success; returns its stdout.
fn frontend_ok(be: &Backend, args: &[&str]) -> String {
    let o = frontend(args);
    assert!(
        o.status.success(),
        "vhost-frontend {args:?} failed:\n{}\nbackend log:\n{}",
        text(&o),
        be.log()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn copy(be: &Backend, out: &Path) -> String {
    frontend_ok(
        be,
        &[
            "-s",
            &be.socket().to_string_lossy(),
            "-o",
            &out.to_string_lossy(),
        ],
    )
}

fn assert_same_file(got: &Path, want: &[u8]) {
    let got = read_file(got).unwrap();
    assert_eq!(got.len(), want.len(), "output size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "output differs from the disk at byte {i} (sector {}, {} bytes in total)",
            i / 512,
            want.len()
        );
    }
}

#[test]
fn copy_equals_disk_of_size_not_multiple_of_4k() {
    let s = setup(ODD_SIZE);
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock)).unwrap();
    let out = s.path("copy.raw");
    let stdout = copy(&be, &out);
    let sectors = ODD_SIZE / 512;
    assert!(
        stdout.contains(&format!("capacity: {sectors} sectors ({ODD_SIZE} bytes)")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("copied: {ODD_SIZE} bytes ({sectors} sectors)")),
        "{stdout}"
    );
    assert!(stdout.contains("up to 16 in flight"), "{stdout}");
    assert_same_file(&out, &read_file(&s.img).unwrap());

    // The backend takes the next frontend after this one left: copy again, into an existing
    // (larger) file that must be truncated.
    std::fs::write(&out, vec![0xaau8; (ODD_SIZE + 8192) as usize]).unwrap();
    copy(&be, &out);
    assert_same_file(&out, &read_file(&s.img).unwrap());
}

#[test]
fn copy_with_small_segments_and_several_backend_queues() {
    // size_max 4 KiB, seg_max 4: 16 KiB requests of four data descriptors each; the backend
    // has four queues, of which the frontend uses the first.
    let size = (3 << 20) + 512;
    let s = setup(size);
    let mut cfg = BackendConfig::new(&s.img, &s.sock).num_queues(4);
    cfg.seg_size_max = 4096;
    cfg.seg_count_max = 4;
    let be = Backend::start(BACKEND, &cfg).unwrap();
    let out = s.path("copy.raw");
    let stdout = copy(&be, &out);
    assert!(stdout.contains("backend queues: 4"), "{stdout}");
    assert!(stdout.contains("num_queues: 4"), "{stdout}");
    assert!(
        stdout.contains("x 16384 bytes (4 data descriptor(s) of <= 4096 bytes)"),
        "{stdout}"
    );
    assert_same_file(&out, &read_file(&s.img).unwrap());

    // One request at a time, one sector each, on a tiny queue.
    let stdout = frontend_ok(
        &be,
        &[
            "-s",
            &s.sock.to_string_lossy(),
            "-o",
            &out.to_string_lossy(),
            "--queue-size",
            "4",
            "--depth",
            "1",
            "--request-size",
            "512",
        ],
    );
    assert!(
        stdout.contains(&format!("in {} requests, up to 1 in flight", size / 512)),
        "{stdout}"
    );
    assert_same_file(&out, &read_file(&s.img).unwrap());
}

#[test]
fn copy_from_readonly_backend() {
    let s = setup(1 << 20);
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock).readonly(true)).unwrap();
    let out = s.path("copy.raw");
    let stdout = copy(&be, &out);
    let acked = stdout
        .lines()
        .find(|l| l.contains("virtio features acked"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(feature_words(acked).contains(&"RO".to_string()), "{acked}");
    assert_same_file(&out, &read_file(&s.img).unwrap());
}

/// The feature names of a `... features ...: 0x... [A B C]` line.
fn feature_words(line: &str) -> Vec<String> {
    let inner = line
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no feature list in {line:?}"));
    inner.split_whitespace().map(str::to_string).collect()
}

/// Output of `--stage <stage>` against `be`; checks that no later stage ran.
fn run_stage(be: &Backend, stage: &str, last: u8) -> String {
    let out = frontend_ok(
        be,
        &["-s", &be.socket().to_string_lossy(), "--stage", stage],
    );
    for later in (last + 1)..=4 {
        assert!(
            !out.contains(&format!("stage {later} ")),
            "--stage {stage} ran stage {later}:\n{out}"
        );
    }
    assert!(out.contains(&format!("stage {last} (")), "{out}");
    out
}

#[test]
fn each_stage_works_alone() {
    let s = setup(ODD_SIZE);
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock).num_queues(2)).unwrap();
    let sectors = ODD_SIZE / 512;

    for stage in ["0", "setup"] {
        let out = run_stage(&be, stage, 0);
        assert!(out.contains("stage 0 setup:"), "{out}");
        // Offered: everything COMPAT.md lists; acked: no EVENT_IDX / INDIRECT_DESC.
        let offered = out
            .lines()
            .find(|l| l.contains("virtio features offered"))
            .unwrap_or_else(|| panic!("{out}"));
        for f in [
            "VERSION_1",
            "SEG_MAX",
            "SIZE_MAX",
            "BLK_SIZE",
            "FLUSH",
            "TOPOLOGY",
            "MQ",
            "CONFIG_WCE",
            "EVENT_IDX",
            "INDIRECT_DESC",
            "PROTOCOL_FEATURES",
        ] {
            assert!(
                feature_words(offered).contains(&f.to_string()),
                "{f} missing: {offered}"
            );
        }
        let acked = out
            .lines()
            .find(|l| l.contains("virtio features acked"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            acked.contains("VERSION_1") && !acked.contains("EVENT_IDX"),
            "{acked}"
        );
        let proto = out
            .lines()
            .find(|l| l.contains("protocol features offered"))
            .unwrap_or_else(|| panic!("{out}"));
        for f in ["CONFIG", "MQ", "REPLY_ACK", "CONFIGURE_MEM_SLOTS"] {
            assert!(
                feature_words(proto).contains(&f.to_string()),
                "{f} missing: {proto}"
            );
        }
        assert!(out.contains("backend queues: 2"), "{out}");
        assert!(!out.contains("capacity"), "{out}");
    }

    for stage in ["1", "config"] {
        let out = run_stage(&be, stage, 1);
        assert!(
            out.contains(&format!("capacity: {sectors} sectors ({ODD_SIZE} bytes)")),
            "{out}"
        );
        assert!(out.contains("num_queues: 2"), "{out}");
        assert!(out.contains("seg_max: 16"), "{out}");
        assert!(out.contains("size_max: 65536"), "{out}");
        assert!(out.contains("blk_size: 512"), "{out}");
    }

    for stage in ["2", "memory"] {
        let out = run_stage(&be, stage, 2);
        assert!(out.contains("stage 1 config:"), "{out}");
        assert!(out.contains("stage 2 memory:"), "{out}");
        assert!(out.contains("region: guest 0x40000000.."), "{out}");
    }

    for stage in ["3", "virtqueue"] {
        let out = run_stage(&be, stage, 3);
        assert!(out.contains("stage 2 memory:"), "{out}");
        assert!(out.contains("stage 3 virtqueue:"), "{out}");
        assert!(out.contains("queue 0: size 128"), "{out}");
        assert!(out.contains("enabled"), "{out}");
    }

    // After all those half-finished sessions the backend still serves a full copy.
    let out = s.path("copy.raw");
    let stdout = frontend_ok(
        &be,
        &[
            "-s",
            &s.sock.to_string_lossy(),
            "--stage",
            "4",
            "-o",
            &out.to_string_lossy(),
        ],
    );
    assert!(stdout.contains("stage 4 copy:"), "{stdout}");
    assert_same_file(&out, &read_file(&s.img).unwrap());
}

#[test]
fn usage_errors() {
    let s = setup(1 << 20);
    // The copy stage (the default) needs --output; checked before connecting.
    let o = frontend(&["-s", &s.sock.to_string_lossy()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--output"),
        "{}",
        text(&o)
    );
    let o = frontend(&["-s", &s.sock.to_string_lossy(), "--stage", "5"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown stage"),
        "{}",
        text(&o)
    );
    // No backend: a connection error after the timeout.
    let o = frontend(&[
        "-s",
        &s.sock.to_string_lossy(),
        "--stage",
        "0",
        "--timeout",
        "0",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("connecting"),
        "{}",
        text(&o)
    );

    // A queue larger than the backend allows is refused at SET_VRING_NUM (REPLY_ACK).
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock)).unwrap();
    let o = frontend(&[
        "-s",
        &s.sock.to_string_lossy(),
        "--stage",
        "virtqueue",
        "--queue-size",
        "512",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    // The error names the stage and the message, then what the vhost crate said.
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("vhost-frontend: stage 3 (virtqueue): SET_VRING_NUM: "),
        "{}",
        text(&o)
    );
    // ... and the backend serves the next frontend.
    let out = s.path("copy.raw");
    copy(&be, &out);
    assert_same_file(&out, &read_file(&s.img).unwrap());
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn copy_from_encrypted_backend_returns_plaintext() {
    let size = (2 << 20) + 3584;
    let s = setup(size);
    // Start from zeros on disk (the pattern would be "ciphertext" for this key).
    std::fs::write(&s.img, vec![0u8; size as usize]).unwrap();
    let keys = format!(
        "encryption_key: [\"{}\", \"{}\"]",
        b64(&[0x42; 32]),
        b64(&[0x99; 32])
    );
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock).extra(keys)).unwrap();

    // Write plaintext through a libblkio client, then disconnect it.
    let plain = pattern_bytes(0, size as usize);
    {
        let mut c = Client::connect_queues(&s.sock, 1).unwrap();
        for (i, chunk) in plain.chunks(64 << 10).enumerate() {
            io_ok(c.write(0, (i as u64) << 16, chunk), "write").unwrap();
        }
        io_ok(c.flush(0), "flush").unwrap();
    }
    let on_disk = read_file(&s.img).unwrap();
    assert_eq!(on_disk.len(), plain.len());
    assert!(
        on_disk
            .chunks(512)
            .zip(plain.chunks(512))
            .all(|(a, b)| a != b),
        "some sector is stored in plaintext"
    );

    let out = s.path("copy.raw");
    copy(&be, &out);
    assert_same_file(&out, &plain);
}

#[test]
fn library_single_reads_and_out_of_range_requests() {
    use std::time::Duration;
    use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions};

    let s = setup(ODD_SIZE);
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock)).unwrap();
    let t = Duration::from_secs(10);
    let mut fe = BlkFrontend::connect(&s.sock, t).unwrap();
    fe.setup().unwrap();
    let cfg = fe.read_config().unwrap();
    let sectors = ODD_SIZE / 512;
    assert_eq!(cfg.capacity, sectors);
    let g = Geometry::new(&IoOptions::default(), &cfg).unwrap();
    fe.setup_memory(&g).unwrap();
    fe.setup_virtqueue(&g).unwrap();

    // The last sector, and the last 1.5 KiB.
    let last = fe.read_sectors(sectors - 1, 512, t).unwrap();
    assert_eq!(last, pattern_bytes(ODD_SIZE - 512, 512));
    let tail = fe.read_sectors(sectors - 3, 1536, t).unwrap();
    assert_eq!(tail, pattern_bytes(ODD_SIZE - 1536, 1536));
    // Past the end, straddling the end, and a sector number that overflows: IOERR, not a hang
    // or a crash, and the queue keeps working.
    for (sector, len) in [(sectors, 512), (sectors - 1, 1024), (u64::MAX, 512)] {
        let e = fe.read_sectors(sector, len, t).unwrap_err().to_string();
        assert!(
            e.contains("IOERR"),
            "sector {sector} len {len}: {e}\n{}",
            be.log()
        );
    }
    let first = fe.read_sectors(0, 4096, t).unwrap();
    assert_eq!(first, pattern_bytes(0, 4096));
}

/// A vhost-user-blk backend that serves IN requests from memory correctly but reports a used
/// length of 0 for every request, as the reference v0.2 backend does (a spec violation Linux
/// guests tolerate). Test-only: the production backend has no way to lie.
mod zero_len {
    use std::io;
    use std::path::Path;
    use std::sync::{Arc, RwLock};

    use ubiblk::virtio_blk::{self, ConfigSpace};
    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::vhost_user::Listener;
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN};
    use virtio_queue::QueueT;
    use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;

    struct Backend {
        disk: Vec<u8>,
        mem: RwLock<GuestMemoryAtomic<GuestMemoryMmap>>,
    }

    impl VhostUserBackend for Backend {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> usize {
            256
        }
        fn features(&self) -> u64 {
            virtio_blk::features(true) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
        }
        fn set_event_idx(&self, _enabled: bool) {}
        fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
            ConfigSpace {
                capacity: self.disk.len() as u64 / 512,
                size_max: 65536,
                seg_max: 4,
                num_queues: 1,
                writeback: true,
            }
            .read(offset, size)
        }
        fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
            *self.mem.write().unwrap() = mem;
            Ok(())
        }
        fn handle_event(
            &self,
            _device_event: u16,
            _evset: EventSet,
            vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> io::Result<()> {
            let vring = &vrings[0];
            let mem = self.mem.read().unwrap().memory().into_inner();
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let (hdr, status) = (descs[0], descs[descs.len() - 1]);
                let kind: u32 = mem.read_obj(hdr.addr()).unwrap();
                let sector: u64 = mem.read_obj(hdr.addr().unchecked_add(8)).unwrap();
                let mut code = VIRTIO_BLK_S_OK as u8;
                if kind == VIRTIO_BLK_T_IN {
                    let mut at = sector as usize * 512;
                    for d in &descs[1..descs.len() - 1] {
                        let len = d.len() as usize;
                        mem.write_slice(&self.disk[at..at + len], d.addr()).unwrap();
                        at += len;
                    }
                } else {
                    code = VIRTIO_BLK_S_UNSUPP as u8;
                }
                mem.write_obj(code, status.addr()).unwrap();
                // The lie under test: 0 instead of the data length + 1.
                vring.add_used(head, 0).unwrap();
            }
            vring.signal_used_queue()
        }
    }

    /// Serves `disk` (a multiple of 512 bytes) on `sock` to one frontend connection.
    pub fn serve(disk: Vec<u8>, sock: &Path) {
        let mut listener = Listener::new(sock, true).unwrap();
        let backend = Arc::new(Backend {
            disk,
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
        });
        let mut daemon = VhostUserDaemon::new(
            "zero-len".to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        // Never joined: its worker thread stays in epoll until the test process exits.
        std::thread::spawn(move || {
            if daemon.start(&mut listener).is_ok() {
                let _ = daemon.wait();
            }
            std::mem::forget(daemon);
        });
    }
}

#[test]
fn copy_accepts_a_used_length_of_0_with_one_warning_unless_strict() {
    let s = setup(ODD_SIZE);
    let disk = read_file(&s.img).unwrap();
    let out = s.path("out.raw");
    let sock = s.path("zero.sock");
    zero_len::serve(disk.clone(), &sock);
    let o = frontend(&["-s", &sock.to_string_lossy(), "-o", &out.to_string_lossy()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_file(&out, &disk);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.matches("used length 0").count(), 1, "{}", text(&o));
    assert!(stderr.contains("--strict"), "{}", text(&o));

    let sock = s.path("zero-strict.sock");
    zero_len::serve(disk.clone(), &sock);
    let strict_out = s.path("strict.raw");
    let o = frontend(&[
        "-s",
        &sock.to_string_lossy(),
        "-o",
        &strict_out.to_string_lossy(),
        "--strict",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("used length 0") && stderr.contains("expected"),
        "{}",
        text(&o)
    );

    // Ours reports the right length: --strict passes, and nothing is warned about.
    let be = Backend::start(BACKEND, &BackendConfig::new(&s.img, &s.sock)).unwrap();
    let o = frontend(&[
        "-s",
        &be.socket().to_string_lossy(),
        "-o",
        &out.to_string_lossy(),
        "--strict",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
    assert_same_file(&out, &disk);
}
