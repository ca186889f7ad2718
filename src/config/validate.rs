//! The checks serde cannot make: ranges and relations between fields, the legacy fields that
//! have no effect, and `cpus` against this process's CPUs.

use super::bounded::range_problem;
use super::{
    field_err, ConfigError, Options, DEVICE_ID_LEN, MAX_CPUS, MAX_NUM_QUEUES,
    MAX_POLL_QUEUE_TIMEOUT_US, MAX_QUEUE_SIZE, MAX_REQUEST_BYTES, SUN_PATH_TOO_LONG,
};

impl Options {
    /// Checks the values serde cannot: ranges, relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(field_err("path", "must not be empty"));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(field_err("socket", "must not be empty"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            return Err(field_err("socket", SUN_PATH_TOO_LONG));
        }
        if !(1..=MAX_NUM_QUEUES).contains(&self.num_queues) {
            let problem = range_problem(1, MAX_NUM_QUEUES.into());
            return Err(field_err("num_queues", problem));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(field_err(
                "queue_size",
                format!("{} is not a power of two", self.queue_size),
            ));
        }
        if self.queue_size > MAX_QUEUE_SIZE {
            let problem = range_problem(1, MAX_QUEUE_SIZE.into());
            return Err(field_err("queue_size", problem));
        }
        if self.seg_size_max < 512 || !self.seg_size_max.is_multiple_of(512) {
            return Err(field_err(
                "seg_size_max",
                format!("{} is not a positive multiple of 512", self.seg_size_max),
            ));
        }
        if self.seg_count_max == 0 {
            return Err(field_err("seg_count_max", "must be at least 1"));
        }
        // Requests are buffered in memory: bound one request to 32 MiB.
        if u64::from(self.seg_size_max) * u64::from(self.seg_count_max) > MAX_REQUEST_BYTES {
            return Err(field_err(
                "seg_count_max",
                "seg_size_max * seg_count_max must not exceed 32 MiB",
            ));
        }
        if self.seg_count_max > u32::from(self.queue_size) {
            return Err(field_err(
                "seg_count_max",
                "must not exceed queue_size (a chain cannot be longer than the ring)",
            ));
        }
        if self.poll_queue_timeout_us > MAX_POLL_QUEUE_TIMEOUT_US {
            let problem = range_problem(0, MAX_POLL_QUEUE_TIMEOUT_US);
            return Err(field_err("poll_queue_timeout_us", problem));
        }
        if self.device_id.len() > DEVICE_ID_LEN {
            return Err(field_err(
                "device_id",
                format!(
                    "is {} bytes long, at most {DEVICE_ID_LEN} allowed",
                    self.device_id.len()
                ),
            ));
        }
        self.validate_lazy()?;
        self.validate_stripe()?;
        if let Some(cpus) = &self.cpus {
            if cpus.len() != usize::from(self.num_queues) {
                return Err(field_err(
                    "cpus",
                    format!(
                        "has {} entries, must have one per queue (num_queues: {})",
                        cpus.len(),
                        self.num_queues
                    ),
                ));
            }
            if let Some(cpu) = cpus.iter().find(|&&c| c >= MAX_CPUS) {
                return Err(field_err(
                    "cpus",
                    format!("CPU {cpu} is out of range (at most {})", MAX_CPUS - 1),
                ));
            }
        }
        if let Some(qos) = &self.qos {
            qos.validate().map_err(ConfigError::Qos)?;
        }
        self.socket_mode()?;
        self.socket_group()?;
        if let Some(keys) = &self.encryption_key {
            if keys.len() != 2 {
                return Err(field_err(
                    "encryption_key",
                    format!("must hold exactly two base64 strings, found {}", keys.len()),
                ));
            }
        }
        Ok(())
    }
}

impl Options {
    /// The legacy fields this config sets that have no effect, with why: the backend warns
    /// about each once at start-up.
    pub fn ignored_fields(&self) -> Vec<(&'static str, &'static str)> {
        [
            (
                self.direct_io.is_some(),
                "direct_io",
                "a v0.1 field; the disk is always opened with O_DIRECT where the file system \
                 allows it",
            ),
            (
                self.track_written == Some(false),
                "track_written",
                "WRITTEN bits are always tracked (readers of the metadata ignore them)",
            ),
        ]
        .into_iter()
        .filter_map(|(set, field, why)| set.then_some((field, why)))
        .collect()
    }

    /// Checks that every `cpus` entry is a CPU this process may run on (its affinity mask at
    /// start-up), so that a typo is an error at start-up rather than a failed pin later.
    pub fn check_cpus(&self) -> Result<(), ConfigError> {
        let Some(cpus) = &self.cpus else {
            return Ok(());
        };
        let allowed = crate::sys::affinity::allowed_cpus()
            .map_err(|e| field_err("cpus", format!("cannot read this process's CPUs: {e}")))?;
        if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(field_err(
                "cpus",
                format!(
                    "CPU {cpu} is not one this process may run on ({})",
                    crate::sys::affinity::format_list(&allowed)
                ),
            ));
        }
        Ok(())
    }
}
