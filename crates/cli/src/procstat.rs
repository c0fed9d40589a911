//! CPU time and peak memory of a process, from `/proc` (Linux; elsewhere `None`), for
//! the bench's cost figures.

/// What a process has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// User plus system CPU time, ms.
    pub(crate) cpu_ms: u64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub(crate) peak_rss_kb: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_S: u64 = 100;

/// The usage of process `pid`.
pub(crate) fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(Usage {
        cpu_ms: ticks * 1000 / TICKS_PER_S,
        peak_rss_kb,
    })
}

/// The resident set size of process `pid` now (`VmRSS`), KiB.
pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// This process's usage.
pub(crate) fn own() -> Option<Usage> {
    usage(std::process::id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        if cfg!(target_os = "linux") {
            let u = super::own().unwrap();
            assert!(u.peak_rss_kb > 0);
        }
    }
}
