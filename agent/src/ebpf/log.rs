//! The aya-log bridge: a task that drains the programs' log ring buffer (`AYA_LOGS`) and
//! re-emits each record as a `tracing` event with `component = "ebpf"`.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::{Level, level_filters::LevelFilter, warn};

/// The running bridge; dropping it stops the task.
pub(crate) struct Bridge {
    task: JoinHandle<()>,
}

impl Bridge {
    /// Starts the bridge on the current tokio runtime. Without a runtime (or if the object has
    /// no log map), eBPF logs are not forwarded; that is worth a warning, not a failure.
    pub(crate) fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                component = "ebpf",
                "no tokio runtime: eBPF logs are not forwarded"
            );
            return None;
        };
        let logger = match EbpfLogger::init_with_logger(ebpf, Forward) {
            Ok(logger) => logger,
            Err(error) => {
                warn!(component = "ebpf", %error, "eBPF logs are not forwarded");
                return None;
            }
        };
        // AsyncFd registers with the runtime's reactor, so enter it first.
        let _entered = runtime.enter();
        // SAFETY: the logger owns the ring buffer map's fd, never closes or replaces it while
        // alive, and the AsyncFd owns the logger until it is dropped.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut logger = match registered {
            Ok(logger) => logger,
            Err(error) => {
                let error = std::io::Error::from(error);
                warn!(component = "ebpf", %error, "eBPF logs are not forwarded");
                return None;
            }
        };
        let task = runtime.spawn(async move {
            loop {
                let mut guard = match logger.readable_mut().await {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!(component = "ebpf", %error, "eBPF log reader stopped");
                        return;
                    }
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Some(Self { task })
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `aya_log::LEVEL` value to patch into the object: the agent's most verbose enabled
/// level, so records nobody would see are not even written to the ring buffer.
pub(crate) fn ebpf_level() -> u8 {
    // aya_log_common::Level: Error = 1 … Trace = 5; 0 disables every record.
    match LevelFilter::current().into_level() {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

/// `log::Log` → `tracing`. aya-log hands records to a `log` logger; the agent logs through
/// `tracing`.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let module = record.module_path().unwrap_or(record.target());
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(component = "ebpf", module, "{message}"),
            log::Level::Warn => tracing::warn!(component = "ebpf", module, "{message}"),
            log::Level::Info => tracing::info!(component = "ebpf", module, "{message}"),
            log::Level::Debug => tracing::debug!(component = "ebpf", module, "{message}"),
            log::Level::Trace => tracing::trace!(component = "ebpf", module, "{message}"),
        }
    }

    fn flush(&self) {}
}
