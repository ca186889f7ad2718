//! A backend standing by for a live migration (another backend holds the disk, see README
//! "Live migration") does not change the disk: `resize` on it is refused, naming why, while the
//! holder's works.

use crate::common::*;
use crate::resize::ask;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");

#[test]
fn resize_on_a_standby_backend_is_refused_and_changes_nothing() {
    let d = pattern_disk("ubiblk-standby", 8 << 20);
    let holder_cfg = BackendConfig::new(&d.img, &d.sock).extra_path("control_socket", &d.ctl);
    let _holder = Backend::start(BIN, &holder_cfg).unwrap();
    let dir = d.img.parent().unwrap();
    let (sock_b, ctl_b) = (dir.join("b.sock"), dir.join("b.ctl"));
    let standby_cfg = BackendConfig::new(&d.img, &sock_b).extra_path("control_socket", &ctl_b);
    let standby = Backend::start(BIN, &standby_cfg).unwrap();
    assert!(
        wait_for_log(&standby, "standing by"),
        "the second backend on the disk should stand by"
    );

    let refused = ask(&ctl_b, r#"resize {"size_bytes":16777216}"#);
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("stands by"), "{refused}");
    assert_eq!(std::fs::metadata(&d.img).unwrap().len(), 8 << 20);

    let grown = ask(&d.ctl, r#"resize {"size_bytes":16777216}"#);
    assert_eq!(grown["size_bytes"], 16 << 20, "{grown}");
    assert_eq!(std::fs::metadata(&d.img).unwrap().len(), 16 << 20);
}

/// Whether `backend`'s log shows `text` within 5 s.
fn wait_for_log(backend: &Backend, text: &str) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(5) {
        if backend.log().contains(text) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}
