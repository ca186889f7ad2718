//! Sector-aligned I/O buffers, reusable through a per-thread pool.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// O_DIRECT needs buffers aligned to the logical block size; a page covers every device.
const ALIGN: usize = 4096;

/// A heap buffer aligned for O_DIRECT. Its address does not change when it is moved, so it
/// can be handed to the kernel while the owning operation is in flight.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf uniquely owns its allocation, like Vec<u8>: no other handle to it exists, so
// moving the IoBuf to another thread moves all access with it.
unsafe impl Send for IoBuf {}
// SAFETY: as Vec<u8>: through a shared reference the bytes are only read (Deref, as_ptr);
// writing needs &mut IoBuf.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows isize");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf { ptr, len, cap }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity; new bytes hold stale data.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialized (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with exactly this layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

/// Recycles buffers by power-of-two size class so the data path does not allocate per request.
#[derive(Default)]
pub struct BufPool {
    classes: Vec<Vec<IoBuf>>,
}

/// Buffers kept per size class; more than a full queue's worth is never needed.
const POOL_DEPTH: usize = 256;

impl BufPool {
    fn class(len: usize) -> usize {
        len.max(ALIGN).next_power_of_two().trailing_zeros() as usize
    }

    /// A buffer of `len` bytes with unspecified contents.
    pub fn get(&mut self, len: usize) -> IoBuf {
        let class = Self::class(len);
        match self.classes.get_mut(class).and_then(Vec::pop) {
            Some(mut b) => {
                b.set_len(len);
                b
            }
            None => {
                let mut b = IoBuf::new(1 << class);
                b.set_len(len);
                b
            }
        }
    }

    pub fn put(&mut self, buf: IoBuf) {
        let class = Self::class(buf.capacity());
        if buf.capacity() != 1 << class {
            return; // not one of ours
        }
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Vec::new);
        }
        if self.classes[class].len() < POOL_DEPTH {
            self.classes[class].push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 65536 + 512] {
            let b = IoBuf::new(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn pool_reuses_by_class() {
        let mut pool = BufPool::default();
        let mut b = pool.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        b[0] = 7;
        let p = b.as_ptr();
        pool.put(b);
        let b2 = pool.get(8192);
        assert_eq!(b2.as_ptr(), p);
        let b3 = pool.get(4096);
        assert_ne!(b3.as_ptr(), p);
    }
}
