//! Sending a file's bytes to a socket without copying them through user space (`sendfile`),
//! and reopening a file without O_DIRECT for it: `sendfile` from an O_DIRECT descriptor
//! copies into fresh pages first, so it saves nothing there.

use std::fs::File;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// `file` opened again, read-only and through the page cache (no O_DIRECT): the same file
/// (`/proc/self/fd`), whatever its path names by now.
pub fn reopen_buffered(file: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Writes `head` and then `len` bytes of `file` from `offset` to `tcp`: the head with
/// MSG_MORE (one segment with the start of the bytes), the bytes with `sendfile`. The
/// socket's send timeout applies. Returns how many of the file's bytes went out before an
/// error, with it: 0 means the stream holds the head only, so the caller may still send the
/// bytes another way; after more, the stream is cut mid-payload. A file that ends early is
/// `UnexpectedEof`.
pub fn send_head_and_file(
    tcp: &TcpStream,
    head: &[u8],
    file: &File,
    offset: u64,
    len: usize,
) -> Result<(), (usize, io::Error)> {
    let mut sent = 0;
    while sent < head.len() {
        let rest = &head[sent..];
        // SAFETY: `rest` is valid for reads of `rest.len()` bytes for the call; the
        // descriptor is the socket `tcp` owns.
        let n = unsafe {
            libc::send(
                tcp.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        match n {
            n if n > 0 => sent += n as usize,
            0 => return Err((0, io::ErrorKind::WriteZero.into())),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => {}
                e => return Err((0, e)),
            },
        }
    }
    let mut off = libc::off_t::try_from(offset)
        .map_err(|_| (0, io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut done = 0;
    while done < len {
        // SAFETY: both descriptors are open for the call (`tcp` and `file` are borrowed);
        // `off` is a valid off_t the kernel reads and advances.
        let n = unsafe { libc::sendfile(tcp.as_raw_fd(), file.as_raw_fd(), &mut off, len - done) };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends {} bytes into a {len}-byte range", done),
                );
                return Err((done, e));
            }
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => {}
                e => return Err((done, e)),
            },
        }
    }
    Ok(())
}

/// Tells the kernel it may drop `file`'s cached pages in the range (best effort: pages still
/// on their way out stay): a disk streamed once does not fill the page cache.
pub fn drop_cached(file: &File, offset: u64, len: usize) {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor `file` keeps open; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::os::unix::fs::FileExt;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    #[test]
    fn the_head_then_the_range_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = reopen_buffered(&File::open(&path).unwrap()).unwrap();
        let (tx, mut rx) = pair();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).unwrap();
            got
        });
        send_head_and_file(&tx, b"HEAD", &f, 1000, 200_000).unwrap();
        // Past the end: the bytes there are sent, then the error says how many.
        let (n, e) = send_head_and_file(&tx, b"", &f, 250_000, 100_000).unwrap_err();
        assert_eq!((n, e.kind()), (50_000, io::ErrorKind::UnexpectedEof));
        // Dropping the cache loses nothing (on tmpfs the cache is the file).
        drop_cached(&f, 0, data.len());
        assert!(std::fs::read(&path).unwrap() == data);
        drop(tx);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..200_004] == data[1000..201_000]);
        assert!(got[200_004..] == data[250_000..]);
    }

    #[test]
    fn a_reopened_file_is_the_same_file_without_o_direct() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"before").unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let f = direct.or_else(|_| File::open(&path)).unwrap();
        let again = reopen_buffered(&f).unwrap();
        // The path now names another file; the reopened one is still the first.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::fs::write(&path, b"other!").unwrap();
        let mut buf = [0u8; 6];
        again.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"before");
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(again.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_DIRECT, 0);
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    }
}
