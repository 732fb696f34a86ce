//! What a benchmark reads about the processes it measures, from `/proc` (Linux): which process
//! listens on a port, its CPU time (`/proc/<pid>/stat` utime + stime) and its memory
//! (`/proc/<pid>/status` VmRSS, and VmHWM: the peak).

use std::collections::HashMap;

/// CPU time and memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// cutime + cstime: the CPU of its children that have ended (and been waited for).
    pub ended_children_ticks: u64,
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2) is
/// in parentheses and may hold spaces or parentheses itself, so fields are counted after its
/// last `)`.
pub fn parse_stat(line: &str) -> Option<u64> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// cutime + cstime (fields 16 and 17) of a `/proc/<pid>/stat` line: what its ended children
/// spent.
pub fn parse_children_stat(line: &str) -> Option<u64> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some(cutime + cstime)
}

/// VmRSS and VmHWM (kB) of a `/proc/<pid>/status` text.
pub fn parse_status(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The process now (None when it is gone or unreadable).
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let (rss_kb, peak_rss_kb) = parse_status(&status);
    Some(Sample {
        cpu_ticks: parse_stat(&stat)?,
        ended_children_ticks: parse_children_stat(&stat).unwrap_or(0),
        rss_kb,
        peak_rss_kb,
    })
}

/// The parent pid (field 4) of a process.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The pid and its children (PostgreSQL serves each connection from a child of the process that
/// listens: their CPU is the server's).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    pids.extend(all_pids().into_iter().filter(|&p| parent(p) == Some(pid)));
    pids
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every common Linux).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The socket inodes listening on `port` in a `/proc/net/tcp{,6}` table.
pub fn parse_listeners(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?;
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *state == "0A")
                .then(|| inode.parse().ok())
                .flatten()
        })
        .collect()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Which process listens on each of `ports` (ports nobody listens on are left out).
pub fn listeners(ports: &[u16]) -> HashMap<u16, u32> {
    let tables = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .collect::<Vec<_>>();
    let mut by_inode = HashMap::new();
    for &port in ports {
        for table in &tables {
            for inode in parse_listeners(table, port) {
                by_inode.insert(inode, port);
            }
        }
    }
    let mut found = HashMap::new();
    if by_inode.is_empty() {
        return found;
    }
    for pid in all_pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok());
            if let Some(port) = inode.and_then(|i| by_inode.get(&i)) {
                found.entry(*port).or_insert(pid);
            }
        }
        if found.len()
            == by_inode
                .values()
                .collect::<std::collections::HashSet<_>>()
                .len()
        {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_is_utime_plus_stime_even_with_a_strange_name() {
        let line = "4242 (agora (up) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 20 5 20 0 \
                    9 0 12345 123456789 4567 18446744073709551615";
        assert_eq!(parse_stat(line), Some(325));
        assert_eq!(parse_stat("garbage"), None);
        // cutime 20 and cstime 5 (fields 16 and 17).
        assert_eq!(parse_children_stat(line), Some(25));
    }

    #[test]
    fn status_gives_rss_and_peak() {
        let text = "Name:\tagora\nVmPeak:\t  900000 kB\nVmHWM:\t   52000 kB\nVmRSS:\t   48000 kB\n";
        assert_eq!(parse_status(text), (48000, 52000));
        assert_eq!(parse_status(""), (0, 0));
    }

    #[test]
    fn listeners_are_found_by_port_and_listen_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:46A0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n   \
            1: 0100007F:46A0 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0\n   \
            2: 0100007F:46A1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0 100 0 0 10 0\n";
        // 0x46A0 = 18080: the listening socket only, not the established connection.
        assert_eq!(parse_listeners(table, 18080), vec![111]);
        assert_eq!(parse_listeners(table, 18081), vec![333]);
        assert!(parse_listeners(table, 9).is_empty());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = sample(std::process::id()).expect("our own /proc entry");
        assert!(me.rss_kb > 0 && me.peak_rss_kb >= me.rss_kb, "{me:?}");
    }
}
