//! The disk reserve. A store that fills its disk fails every write at once, and SQLite needs room
//! to roll back and checkpoint; so new data is refused early, while `min_free_bytes` are still free,
//! and taken again once a tenth more than that is free (no flapping at the line). Writes that free
//! space or keep the fleet's picture right (retention, consumer positions, hellos, liveness
//! transitions) go on inside the reserve.
//!
//! The state is checked after commits (at most every 100 ms, so that a burst cannot run through
//! the reserve) and every second by the checkpoint thread, and published on a watch channel:
//! health, the ops alert `NodekeeperStoreDiskLow` and agent sessions follow it. A real "disk full"
//! from SQLite turns it on at once. It is logged once per change, and every minute while low.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often a low disk is logged again while it stays low.
const REMINDER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskState {
    /// New data is refused.
    pub low: bool,
    /// Bytes free for the center's user at the last check.
    pub free: u64,
    pub reserve: u64,
}

pub(crate) struct Space {
    dir: PathBuf,
    reserve: u64,
    state: watch::Sender<DiskState>,
    last_log: std::sync::Mutex<Option<Instant>>,
    last_check: std::sync::Mutex<Instant>,
}

/// The shortest time between two checks after commits.
const CHECK_AFTER_COMMIT: Duration = Duration::from_millis(100);

impl Space {
    pub(crate) fn new(dir: PathBuf, reserve: u64) -> Space {
        let space = Space {
            dir,
            reserve,
            state: watch::Sender::new(DiskState { low: false, free: u64::MAX, reserve }),
            last_log: std::sync::Mutex::new(None),
            last_check: std::sync::Mutex::new(Instant::now()),
        };
        space.check();
        space
    }

    pub(crate) fn watch(&self) -> watch::Receiver<DiskState> {
        self.state.subscribe()
    }

    pub(crate) fn state(&self) -> DiskState {
        *self.state.borrow()
    }

    fn free(&self) -> Option<u64> {
        match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(s) => Some(s.blocks_available() * s.fragment_size()),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the free space of the store's disk");
                None
            }
        }
    }

    /// Measures the free space and moves the state: low below the reserve, back above it plus a
    /// tenth (at least 1 MiB, so that a reserve of 0 recovers from a full disk too).
    pub(crate) fn check(&self) {
        let Some(free) = self.free() else { return };
        let was = self.state();
        let low = if was.low { free < self.reserve + (self.reserve / 10).max(1 << 20) } else { free < self.reserve };
        self.set(DiskState { low, free, reserve: self.reserve });
    }

    /// Checks unless a check ran within the last `CHECK_AFTER_COMMIT`.
    pub(crate) fn check_soon(&self) {
        {
            let mut last = self.last_check.lock().expect("space check lock");
            if last.elapsed() < CHECK_AFTER_COMMIT {
                return;
            }
            *last = Instant::now();
        }
        self.check();
    }

    /// SQLite said the disk is full: refuse new data from now on.
    pub(crate) fn full(&self) {
        let free = self.free().unwrap_or(0);
        self.set(DiskState { low: true, free, reserve: self.reserve });
    }

    fn set(&self, new: DiskState) {
        let was = self.state();
        let mut last_log = self.last_log.lock().expect("space log lock");
        if new.low != was.low {
            if new.low {
                tracing::error!(free = new.free, reserve = new.reserve, dir = %self.dir.display(),
                    "store disk low: new events are refused until space is freed");
            } else {
                tracing::info!(free = new.free, reserve = new.reserve, "store disk has room again: taking new events");
            }
            *last_log = Some(Instant::now());
        } else if new.low && last_log.is_none_or(|t| t.elapsed() >= REMINDER) {
            tracing::error!(free = new.free, reserve = new.reserve, dir = %self.dir.display(),
                "store disk still low: new events are refused");
            *last_log = Some(Instant::now());
        }
        self.state.send_replace(new);
    }
}
