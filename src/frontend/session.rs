//! The vhost-user session: a connection brought up stage by stage, single reads on queue 0,
//! and stage 4 around the copy loop of copy.rs.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::copy;
use super::error::{ensure, io_err, mem_err, request_err, Error, Result};
use super::log::DirtyLog;
use super::ring::Ring;
use super::{
    wanted_features, wanted_protocol_features, BlkConfig, CopyInfo, Geometry, Layout, MemoryInfo,
    SetupInfo, SharedMemory, VirtqueueInfo, CONFIG_LEN, GUEST_BASE, SECTOR_SIZE,
};

/// A connection to a vhost-user-blk backend, brought up stage by stage.
pub struct BlkFrontend {
    fe: Frontend,
    offered_features: u64,
    acked_features: u64,
    protocol_acked: VhostUserProtocolFeatures,
    config: Option<BlkConfig>,
    memory: Option<SharedMemory>,
    ring: Option<Ring>,
    strict: bool,
    /// Ack INFLIGHT_SHMFD in [`BlkFrontend::setup`] (see [`BlkFrontend::with_inflight`]).
    want_inflight: bool,
    /// Ack LOG_SHMFD in [`BlkFrontend::setup`] (see [`BlkFrontend::with_dirty_log`]).
    want_log: bool,
    /// The dirty log handed over with SET_LOG_BASE, once [`BlkFrontend::start_dirty_log`] ran.
    log: Option<DirtyLog>,
}

impl BlkFrontend {
    /// Connects to `socket`, retrying for up to `timeout` while it does not exist yet or
    /// refuses connections.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<BlkFrontend> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(Error::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    })
                }
            }
        };
        Ok(BlkFrontend {
            fe: Frontend::from_stream(stream, 1),
            offered_features: 0,
            acked_features: 0,
            protocol_acked: VhostUserProtocolFeatures::empty(),
            config: None,
            memory: None,
            ring: None,
            strict: false,
            want_inflight: false,
            want_log: false,
            log: None,
        })
    }

    /// Also negotiates LOG_SHMFD in [`BlkFrontend::setup`], when the backend offers it, for
    /// [`BlkFrontend::start_dirty_log`].
    pub fn with_dirty_log(mut self) -> BlkFrontend {
        self.want_log = true;
        self
    }

    /// Also negotiates INFLIGHT_SHMFD in [`BlkFrontend::setup`], when the backend offers it.
    pub fn with_inflight(mut self) -> BlkFrontend {
        self.want_inflight = true;
        self
    }

    /// Like a VMM whose backend went away: a new connection to `socket` (a new backend)
    /// keeping this session's memory, queue 0 and what the guest did with it. Bring it up
    /// with [`BlkFrontend::setup`], [`BlkFrontend::set_inflight`] and
    /// [`BlkFrontend::resume_virtqueue`].
    pub fn reconnect(self, socket: &Path, timeout: Duration) -> Result<BlkFrontend> {
        let mut next = BlkFrontend::connect(socket, timeout)?;
        next.want_inflight = self.want_inflight;
        next.config = self.config;
        next.memory = self.memory;
        next.ring = self.ring;
        Ok(next)
    }

    /// The underlying rust-vmm frontend, for messages this type does not wrap.
    pub fn inner(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Stage 0: SET_OWNER, GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
    pub fn setup(&mut self) -> Result<SetupInfo> {
        self.fe.set_owner().map_err(request_err("SET_OWNER"))?;
        let offered = self
            .fe
            .get_features()
            .map_err(request_err("GET_FEATURES"))?;
        ensure!(
            offered & (1u64 << VIRTIO_F_VERSION_1) != 0,
            Backend,
            "backend does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"
        );
        ensure!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
            Backend,
            "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES (features {offered:#x})"
        );
        let acked = offered & wanted_features();
        self.fe
            .set_features(acked)
            .map_err(request_err("SET_FEATURES"))?;
        self.offered_features = offered;
        self.acked_features = acked;

        let proto_offered = self
            .fe
            .get_protocol_features()
            .map_err(request_err("GET_PROTOCOL_FEATURES"))?;
        // Keep the raw bits, including any the vhost crate does not know.
        let proto_offered_bits = proto_offered.bits();
        let mut wanted = wanted_protocol_features();
        if self.want_inflight {
            wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if self.want_log {
            wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        let proto_acked = proto_offered & wanted;
        self.protocol_acked = proto_acked;
        self.fe
            .set_protocol_features(proto_acked)
            .map_err(request_err("SET_PROTOCOL_FEATURES"))?;
        if proto_acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // From now on every request that has no reply of its own is acknowledged, so a
            // backend refusing something is reported at the request that caused it.
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if proto_acked.contains(VhostUserProtocolFeatures::MQ) {
            let n = self
                .fe
                .get_queue_num()
                .map_err(request_err("GET_QUEUE_NUM"))?;
            ensure!(n >= 1, Backend, "backend reports {n} queues");
            Some(n)
        } else {
            None
        };
        Ok(SetupInfo {
            features_offered: offered,
            features_acked: acked,
            protocol_offered: proto_offered_bits,
            protocol_acked: proto_acked.bits(),
            backend_queues,
        })
    }

    /// Stage 1: GET_CONFIG (at offset 0, like QEMU).
    pub fn read_config(&mut self) -> Result<BlkConfig> {
        let buf = vec![0u8; CONFIG_LEN as usize];
        let (_, payload) = self
            .fe
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::empty(), &buf)
            .map_err(request_err("GET_CONFIG"))?;
        let cfg = BlkConfig::parse(&payload, self.acked_features)?;
        ensure!(
            cfg.size_bytes().is_some(),
            Backend,
            "absurd capacity {} sectors",
            cfg.capacity
        );
        if let Some(n) = cfg.num_queues {
            ensure!(n >= 1, Backend, "config reports num_queues = 0");
        }
        self.config = Some(cfg.clone());
        Ok(cfg)
    }

    /// Stage 2: allocates the shared memory for the geometry `g` and sends SET_MEM_TABLE.
    pub fn setup_memory(&mut self, g: &Geometry) -> Result<MemoryInfo> {
        let layout = Layout::new(g);
        let mem = SharedMemory::new(layout.size)?;
        self.fe
            .set_mem_table(&[mem.info])
            .map_err(request_err("SET_MEM_TABLE"))?;
        let info = MemoryInfo {
            guest_addr: mem.info.guest_phys_addr,
            size: mem.info.memory_size,
            user_addr: mem.info.userspace_addr,
        };
        self.memory = Some(mem);
        Ok(info)
    }

    /// Stage 3: lays out queue 0 in the shared memory and hands it to the backend.
    pub fn setup_virtqueue(&mut self, g: &Geometry) -> Result<VirtqueueInfo> {
        let mem = self
            .memory
            .as_ref()
            .ok_or(Error::Order("virtqueue stage needs the memory stage first"))?;
        let layout = Layout::new(g);
        ensure!(
            layout.size <= mem.info.memory_size,
            Memory,
            "memory region too small for the queue"
        );
        let base = GUEST_BASE;
        // Fresh rings: everything zero (avail/used flags and indexes included).
        let zeroes = vec![0u8; layout.headers as usize];
        mem.mem
            .write_slice(&zeroes, GuestAddress(base + layout.desc))
            .map_err(mem_err("clearing the rings"))?;
        let q = g.queue_size;
        let config = mem.vring_config(&layout, q)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(io_err("kick eventfd"))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(io_err("call eventfd"))?;
        hand_over_ring(&mut self.fe, &config, 0, &kick, &call)?;
        self.ring = Some(Ring::new(g.clone(), layout.clone(), kick, call));
        Ok(VirtqueueInfo {
            index: 0,
            geometry: g.clone(),
            desc: base + layout.desc,
            avail: base + layout.avail,
            used: base + layout.used,
        })
    }

    /// Starts logging as QEMU does when a migration starts (after stage 2 and
    /// [`BlkFrontend::with_dirty_log`]): SET_LOG_BASE with a fresh log covering guest memory,
    /// then SET_FEATURES with `VHOST_F_LOG_ALL` added. Read it with [`BlkFrontend::dirty_log`].
    pub fn start_dirty_log(&mut self) -> Result<()> {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        ensure!(
            self.offered_features & log_all != 0,
            Backend,
            "backend does not offer VHOST_F_LOG_ALL (features {:#x})",
            self.offered_features
        );
        ensure!(
            self.protocol_acked
                .contains(VhostUserProtocolFeatures::LOG_SHMFD),
            Backend,
            "LOG_SHMFD was not negotiated (protocol features {:#x})",
            self.protocol_acked.bits()
        );
        let mem = self
            .memory
            .as_ref()
            .ok_or(Error::Order("the dirty log needs the memory stage first"))?;
        let log = DirtyLog::new(mem.info.guest_phys_addr + mem.info.memory_size)?;
        self.fe
            .set_log_base(0, Some(log.region()))
            .map_err(request_err("SET_LOG_BASE"))?;
        self.fe
            .set_features(self.acked_features | log_all)
            .map_err(request_err("SET_FEATURES"))?;
        self.log = Some(log);
        Ok(())
    }

    /// Stops logging as QEMU does when a migration ends or is cancelled: SET_FEATURES without
    /// `VHOST_F_LOG_ALL`. The log stays mapped here, to check nothing more is marked.
    pub fn stop_dirty_log(&mut self) -> Result<()> {
        self.fe
            .set_features(self.acked_features)
            .map_err(request_err("SET_FEATURES"))
    }

    /// SET_MEM_TABLE again with the same memory, as a VMM does when the guest's memory map
    /// changes: the backend maps it anew (and must keep logging it, during a migration).
    pub fn resend_mem_table(&mut self) -> Result<()> {
        let mem = self.memory.as_ref().ok_or(Error::Order(
            "resending the memory table needs the memory stage",
        ))?;
        self.fe
            .set_mem_table(&[mem.info])
            .map_err(request_err("SET_MEM_TABLE"))?;
        Ok(())
    }

    /// The log of [`BlkFrontend::start_dirty_log`].
    pub fn dirty_log(&self) -> Option<&DirtyLog> {
        self.log.as_ref()
    }

    /// Where queue 0 and its requests are in guest memory (after stage 3), as offsets from
    /// [`GUEST_BASE`]: the pages a backend writes are its used ring, status bytes and data.
    pub fn layout(&self) -> Option<&Layout> {
        self.ring.as_ref().map(|r| &r.layout)
    }

    /// GET_INFLIGHT_FD for `num_queues` queues of `queue_size`: the region's description and
    /// file, to hand to this backend and to the next ones with [`BlkFrontend::set_inflight`].
    pub fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(VhostUserInflight, File)> {
        self.fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, num_queues, queue_size))
            .map_err(request_err("GET_INFLIGHT_FD"))
    }

    /// SET_INFLIGHT_FD: the region from [`BlkFrontend::get_inflight`] (of this or an earlier
    /// backend). A VMM sends it before the rings, as here.
    pub fn set_inflight(&mut self, info: &VhostUserInflight, file: &File) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.fe
            .set_inflight_fd(info, file.as_raw_fd())
            .map_err(request_err("SET_INFLIGHT_FD"))
    }

    /// After [`BlkFrontend::reconnect`] and [`BlkFrontend::setup`]: hands the same memory and
    /// queue 0 to the new backend as QEMU does when its backend died: the avail ring rewound
    /// to the used index the old backend left (SET_VRING_BASE), nothing else changed. Returns
    /// that base.
    pub fn resume_virtqueue(&mut self) -> Result<u16> {
        let (Some(mem), Some(ring)) = (self.memory.as_ref(), self.ring.as_ref()) else {
            return Err(Error::Order("resuming needs a virtqueue to resume"));
        };
        self.fe
            .set_mem_table(&[mem.info])
            .map_err(request_err("SET_MEM_TABLE"))?;
        let config = mem.vring_config(&ring.layout, ring.geometry.queue_size)?;
        let used = ring.used_idx_in_memory(mem)?;
        let (kick, call) = ring.eventfds();
        hand_over_ring(&mut self.fe, &config, used, kick, call)?;
        Ok(used)
    }

    /// Makes a read of `len` bytes at `sector` available in request slot `slot` (after stage
    /// 3) and kicks; [`BlkFrontend::wait_completions`] reports it. For tests that keep several
    /// requests in flight and see in which order they complete.
    pub fn submit_read_in_slot(&mut self, slot: u16, sector: u64, len: u32) -> Result<()> {
        let (Some(mem), Some(ring)) = (self.memory.as_ref(), self.ring.as_mut()) else {
            return Err(Error::Order("reads need the virtqueue stage first"));
        };
        ensure!(
            slot < ring.geometry.slots && len > 0 && len <= ring.geometry.chunk,
            Options,
            "slot {slot} or length {len} out of the geometry"
        );
        ring.submit_read(mem, slot, sector, len)?;
        ring.notify(mem)
    }

    /// Waits up to `timeout` for completions (with `in_flight` requests outstanding) and
    /// returns each as (slot, used length); an entry that is not the head of a request slot
    /// is an error.
    pub fn wait_completions(
        &mut self,
        in_flight: usize,
        timeout: Duration,
    ) -> Result<Vec<(u16, u32)>> {
        let (Some(mem), Some(ring)) = (self.memory.as_ref(), self.ring.as_mut()) else {
            return Err(Error::Order("completions need the virtqueue stage first"));
        };
        let done = ring.wait_used(mem, in_flight, timeout)?;
        done.into_iter()
            .map(|(id, len)| Ok((ring.slot_of(id)?, len)))
            .collect()
    }

    /// The data of the read in `slot` (of `len` bytes at `sector`), once completed: its status
    /// must be OK.
    pub fn slot_data(&self, slot: u16, sector: u64, len: u32) -> Result<Vec<u8>> {
        let (Some(mem), Some(ring)) = (self.memory.as_ref(), self.ring.as_ref()) else {
            return Err(Error::Order("reads need the virtqueue stage first"));
        };
        ring.check_status(mem, slot, sector, len, None)?;
        let mut data = vec![0u8; len as usize];
        mem.mem
            .read_slice(&mut data, ring.data_addr(slot))
            .map_err(mem_err("reading request data"))?;
        Ok(data)
    }

    /// The avail index this session published and the used index in memory, for queue 0.
    pub fn ring_indexes(&self) -> Result<(u16, u16)> {
        let (Some(mem), Some(ring)) = (self.memory.as_ref(), self.ring.as_ref()) else {
            return Err(Error::Order("indexes need the virtqueue stage first"));
        };
        Ok((ring.avail_idx, ring.used_idx_in_memory(mem)?))
    }

    /// GET_VRING_BASE on queue 0: stops it (the backend finishes what it has) and returns where
    /// it stopped on the avail ring.
    pub fn stop_queue(&mut self) -> Result<u32> {
        self.fe
            .get_vring_base(0)
            .map_err(request_err("GET_VRING_BASE"))
    }

    /// For tests of a hostile guest, after stage 3: sets queue 0's avail index to `idx` (e.g.
    /// more than a ring ahead of the used index, which no chain can back) and kicks.
    pub fn force_avail_index(&mut self, idx: u16) -> Result<()> {
        let (Some(mem), Some(ring)) = (self.memory.as_ref(), self.ring.as_ref()) else {
            return Err(Error::Order(
                "a forced avail index needs the virtqueue stage first",
            ));
        };
        ring.force_avail_index(mem, idx)
    }

    /// One synchronous IN request for `len` bytes (a multiple of 512, at most the geometry's
    /// request size) at `sector`, after stage 3. No range check against the capacity is made
    /// here, so tests can send out-of-range requests: a non-OK status is an error that names
    /// it (e.g. "status 1 (IOERR)").
    pub fn read_sectors(&mut self, sector: u64, len: u32, timeout: Duration) -> Result<Vec<u8>> {
        self.read_sectors_at(sector, len, 0, timeout)
    }

    /// [`BlkFrontend::read_sectors`] into a buffer `data_off` bytes into slot 0's data area
    /// (e.g. 1: a buffer the backend cannot hand to the device as is).
    pub fn read_sectors_at(
        &mut self,
        sector: u64,
        len: u32,
        data_off: u32,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let mem = self
            .memory
            .as_ref()
            .ok_or(Error::Order("reads need the memory stage first"))?;
        let ring = self
            .ring
            .as_mut()
            .ok_or(Error::Order("reads need the virtqueue stage first"))?;
        ensure!(
            len > 0 && u64::from(len).is_multiple_of(SECTOR_SIZE) && len <= ring.geometry.chunk,
            Options,
            "read length {len} is not a multiple of 512 in 512..={}",
            ring.geometry.chunk
        );
        ring.submit_read_at(mem, 0, sector, len, data_off)?;
        ring.notify(mem)?;
        let done = ring.wait_used(mem, 1, timeout)?;
        let &[(id, used_len)] = done.as_slice() else {
            return Err(Error::Backend(format!(
                "expected one completion, got {}",
                done.len()
            )));
        };
        ensure!(
            ring.slot_of(id)? == 0,
            Backend,
            "backend completed descriptor {id}, which is not in flight"
        );
        ring.check_status(mem, 0, sector, len, Some(used_len))?;
        ensure!(
            used_len == len + 1,
            Backend,
            "backend reported used length {used_len} for a {len}-byte read (expected {})",
            len + 1
        );
        let mut data = vec![0u8; len as usize];
        mem.mem
            .read_slice(
                &mut data,
                GuestAddress(ring.data_addr(0).0 + u64::from(data_off)),
            )
            .map_err(mem_err("reading request data"))?;
        Ok(data)
    }

    /// Stage 4: reads the whole disk (`capacity` sectors, from stage 1) into `out`.
    /// `progress` is called with the number of bytes copied so far after each completion.
    /// With `strict`, the copy refuses a used length of 0, which some backends (the reference
    /// v0.2 among them) report for every request, against the spec; Linux guests ignore it.
    /// Without it (the default) such a read is trusted to have filled its buffer, checked by
    /// its status byte, and one warning per copy says so.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    pub fn copy_disk(
        &mut self,
        out: &File,
        timeout: Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<CopyInfo> {
        let capacity = self
            .config
            .as_ref()
            .ok_or(Error::Order("copy needs the config stage first"))?
            .capacity;
        let mem = self
            .memory
            .as_ref()
            .ok_or(Error::Order("copy needs the memory stage first"))?;
        let ring = self
            .ring
            .as_mut()
            .ok_or(Error::Order("copy needs the virtqueue stage first"))?;
        let start = Instant::now();
        let copied = copy::copy(
            ring,
            mem,
            capacity,
            out,
            timeout,
            self.strict,
            &mut progress,
        )?;
        // Stop the ring the way a VMM does (the backend finishes what it has and reports where
        // it stopped), then check it consumed exactly what we made available.
        let base = self
            .fe
            .get_vring_base(0)
            .map_err(request_err("GET_VRING_BASE"))?;
        let ring = self.ring.take();
        if let Some(r) = &ring {
            ensure!(
                base == u32::from(r.avail_idx),
                Backend,
                "GET_VRING_BASE says the backend stopped at avail index {base}, but {} requests \
                 were made available",
                r.avail_idx
            );
        }
        Ok(CopyInfo {
            bytes: copied.bytes,
            sectors: capacity,
            requests: copied.requests,
            max_in_flight: copied.max_in_flight,
            elapsed: start.elapsed(),
            vring_base: Some(base),
        })
    }
}

/// SET_VRING_NUM/ADDR/BASE/CALL/KICK and SET_VRING_ENABLE for queue 0.
fn hand_over_ring(
    fe: &mut Frontend,
    config: &VringConfigData,
    base: u16,
    kick: &EventFd,
    call: &EventFd,
) -> Result<()> {
    fe.set_vring_num(0, config.queue_size)
        .map_err(request_err("SET_VRING_NUM"))?;
    fe.set_vring_addr(0, config)
        .map_err(request_err("SET_VRING_ADDR"))?;
    fe.set_vring_base(0, base)
        .map_err(request_err("SET_VRING_BASE"))?;
    fe.set_vring_call(0, call)
        .map_err(request_err("SET_VRING_CALL"))?;
    fe.set_vring_kick(0, kick)
        .map_err(request_err("SET_VRING_KICK"))?;
    fe.set_vring_enable(0, true)
        .map_err(request_err("SET_VRING_ENABLE"))
}
