//! Verdict and error counters: one per-CPU `Stats` entry, so increments need no atomics
//! (these program types run with migration disabled). The agent sums the CPUs.

/// Increments one `Stats` field of the current CPU: `count!(connect_redirected)`.
macro_rules! count {
    ($field:ident) => {
        if let Some(stats) = $crate::STATS.get_ptr_mut(0) {
            // SAFETY: index 0 of a one-entry per-CPU array always exists; the pointer is this
            // CPU's slot, which nothing else writes while this program runs on this CPU.
            unsafe { (*stats).$field += 1 };
        }
    };
}
pub(crate) use count;
