//! How much of everything a run measures: the full run, or `--quick` (CI keeps the
//! harness working with it; its figures are rough).

/// How much of everything: the full run, or `--quick`.
pub struct Plan {
    pub reps: usize,
    pub tput_secs: f64,
    pub streams: &'static [usize],
    pub rr_count: usize,
    pub rr_warmup: usize,
    pub rr_sizes: &'static [usize],
    pub crr_secs: f64,
    pub scale_pods: usize,
    pub hold_conns: usize,
    pub hostile_conns: usize,
    pub cp_workloads: usize,
    pub cp_services: usize,
    pub cp_policies: usize,
    pub http_rate: f64,
    pub http_secs: f64,
    /// Long-lived connections streaming across each rolling upgrade, and for how long.
    pub upgrade_conns: usize,
    pub upgrade_time: std::time::Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                reps: 3,
                tput_secs: 1.0,
                streams: &[1, 8, 64],
                rr_count: 3_000,
                rr_warmup: 300,
                rr_sizes: &[1, 1024],
                crr_secs: 1.0,
                scale_pods: 10,
                hold_conns: 100,
                hostile_conns: 1_000,
                cp_workloads: 1_000,
                cp_services: 200,
                cp_policies: 100,
                http_rate: 500.0,
                http_secs: 1.0,
                upgrade_conns: 50,
                upgrade_time: std::time::Duration::from_secs(8),
            }
        } else {
            Plan {
                reps: 3,
                tput_secs: 10.0,
                streams: &[1, 8, 64],
                rr_count: 50_000,
                rr_warmup: 2_000,
                rr_sizes: &[1, 1024],
                crr_secs: 5.0,
                scale_pods: 100,
                hold_conns: 1_000,
                hostile_conns: 10_000,
                cp_workloads: 10_000,
                cp_services: 2_000,
                cp_policies: 1_000,
                http_rate: 2_000.0,
                http_secs: 5.0,
                upgrade_conns: 200,
                upgrade_time: std::time::Duration::from_secs(15),
            }
        }
    }
}
