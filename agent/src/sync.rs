//! The agent's one lock type: a mutex that cannot be poisoned.
//!
//! `std::sync::Mutex` marks itself poisoned when a thread panics while holding it, and
//! every `lock()` then returns an error. Every lock in the agent guards data that stays
//! valid whatever a panicking holder left half done (counters, maps of handles, a cached
//! view), so every caller would take the guard anyway: that choice is made here, once,
//! instead of at each call site. `clippy.toml` disallows the std type elsewhere.
#![allow(clippy::disallowed_types, reason = "the one wrapper of the std mutex")]

use std::{fmt, sync::PoisonError, time::Duration};

pub use std::sync::MutexGuard;

/// A mutual-exclusion lock whose `lock` never fails (see the module's docs).
#[derive(Default)]
pub struct Mutex<T: ?Sized>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Waits for the lock; a lock a panicking thread held is taken over as it stands.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The data, without locking: `&mut self` proves nobody else holds it.
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A condition variable paired with `Mutex`, whose waits never fail either.
#[derive(Debug, Default)]
pub struct Condvar(std::sync::Condvar);

impl Condvar {
    /// Releases `guard`, waits for a notification, and takes the lock again.
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// As `wait`, for at most `timeout`.
    pub fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T> {
        self.0
            .wait_timeout(guard, timeout)
            .map_or_else(|e| e.into_inner().0, |(guard, _)| guard)
    }

    pub fn notify_one(&self) {
        self.0.notify_one();
    }

    pub fn notify_all(&self) {
        self.0.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_lock_held_by_a_panicking_thread_is_still_usable() {
        let counter = Arc::new(Mutex::new(1));
        let holder = Arc::clone(&counter);
        let panicked = std::thread::spawn(move || {
            let mut guard = holder.lock();
            *guard += 1;
            panic!("a bug while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        *counter.lock() += 1;
        assert_eq!(*counter.lock(), 3);
    }
}
