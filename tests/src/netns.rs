//! Test hosts in network namespaces: a bridge in its own namespace, one namespace per host
//! (`eth0`, 10.77.S.10+i/24) on a veth into the bridge, and the root namespace (where the test,
//! the event center and a detector run) on another veth as 10.77.S.1. Links can be cut and
//! shaped with `tc netem`. Needs root; everything is removed on drop, and namespaces left by a
//! test process that died are removed by the next one.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|c| c.wait_with_output());
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("{}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            panic!("{}: {e} (scripts/install-test-deps.sh installs iproute2; the tests need root)", args.join(" "))
        }
    }
}

fn quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Removes namespaces and links of test processes that are gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip")
        .args(["netns", "list"])
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|c| c.wait_with_output())
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(rest) = name.strip_prefix("nkt")
            && let Some(pid) = rest.split('x').next().and_then(|p| u32::from_str_radix(p, 16).ok())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            quiet(&["ip", "netns", "del", name]);
            if let Some(id) = name.strip_suffix('b') {
                quiet(&["ip", "link", "del", &format!("{id}r")]);
            }
        }
    }
}

pub struct Net {
    id: String,
    pub subnet: u8,
    hosts: usize,
}

impl Net {
    pub fn new(hosts: usize) -> Net {
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("nkt{pid:x}x{n}");
        assert!(id.len() + 4 <= 15, "interface names are at most 15 characters: {id}");
        let subnet = ((pid.wrapping_mul(7) + n * 13) % 240 + 10) as u8;
        let net = Net { id, subnet, hosts };
        let b = net.bridge_ns();
        sh(&["ip", "netns", "add", &b]);
        sh(&["ip", "-n", &b, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &b, "link", "set", "br0", "up"]);
        let (r, rb) = (format!("{}r", net.id), format!("{}rb", net.id));
        sh(&["ip", "link", "add", &r, "type", "veth", "peer", "name", &rb]);
        sh(&["ip", "link", "set", &rb, "netns", &b]);
        sh(&["ip", "-n", &b, "link", "set", &rb, "master", "br0", "up"]);
        sh(&["ip", "addr", "add", &format!("10.77.{subnet}.1/24"), "dev", &r]);
        sh(&["ip", "link", "set", &r, "up"]);
        for i in 0..hosts {
            net.add_ns(&net.host_ns(i), &net.host_ip(i).to_string(), &format!("{}h{i}", net.id));
        }
        net
    }

    fn bridge_ns(&self) -> String {
        format!("{}b", self.id)
    }

    fn add_ns(&self, ns: &str, ip: &str, link: &str) {
        let b = self.bridge_ns();
        let lb = format!("{link}b");
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "link", "add", link, "type", "veth", "peer", "name", &lb]);
        sh(&["ip", "link", "set", link, "netns", ns]);
        sh(&["ip", "-n", ns, "link", "set", link, "name", "eth0"]);
        sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        sh(&["ip", "link", "set", &lb, "netns", &b]);
        sh(&["ip", "-n", &b, "link", "set", &lb, "master", "br0", "up"]);
    }

    /// Another namespace on the bridge without an agent (a second detector replica), at
    /// 10.77.S.200.
    pub fn add_extra(&self) -> (String, IpAddr) {
        let ns = format!("{}d", self.id);
        let ip = format!("10.77.{}.200", self.subnet);
        self.add_ns(&ns, &ip, &format!("{}d", self.id));
        (ns, ip.parse().expect("an address"))
    }

    pub fn host_ns(&self, i: usize) -> String {
        format!("{}h{i}", self.id)
    }

    pub fn host_ip(&self, i: usize) -> IpAddr {
        format!("10.77.{}.{}", self.subnet, 10 + i).parse().expect("an address")
    }

    /// The root namespace's address on the bridge (where the center listens).
    pub fn hub_ip(&self) -> IpAddr {
        format!("10.77.{}.1", self.subnet).parse().expect("an address")
    }

    fn set_link(&self, link: &str, up: bool) {
        sh(&["ip", "-n", &self.bridge_ns(), "link", "set", link, if up { "up" } else { "down" }]);
    }

    /// Cuts (or restores) host `i`'s link to the bridge.
    pub fn cut_host(&self, i: usize, cut: bool) {
        self.set_link(&format!("{}h{i}b", self.id), !cut);
    }

    /// Cuts (or restores) the root namespace's link: the center and the detector running there
    /// lose every host.
    pub fn cut_hub(&self, cut: bool) {
        self.set_link(&format!("{}rb", self.id), !cut);
    }

    /// Drops host `i`'s traffic to `addr` (a blackhole route in the host's namespace).
    pub fn blackhole(&self, i: usize, addr: IpAddr) {
        sh(&["ip", "-n", &self.host_ns(i), "route", "add", "blackhole", &format!("{addr}/32")]);
    }

    /// `tc netem` with `args` (e.g. "loss 5% delay 100ms 100ms") on every link, both ways.
    /// False when the kernel has no netem.
    pub fn netem_everywhere(&self, args: &str) -> bool {
        let mut devices: Vec<Vec<String>> =
            (0..self.hosts).map(|i| vec!["-n".to_owned(), self.host_ns(i), "eth0".to_owned()]).collect();
        devices.push(vec![format!("{}r", self.id)]);
        for d in devices {
            let (ns, dev) = d.split_at(d.len() - 1);
            let mut cmd: Vec<&str> = vec!["tc"];
            cmd.extend(ns.iter().map(String::as_str));
            cmd.extend(["qdisc", "add", "dev", dev[0].as_str(), "root", "netem"]);
            cmd.extend(args.split_whitespace());
            let out = Command::new(cmd[0])
                .args(&cmd[1..])
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .and_then(|c| c.wait_with_output());
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) if String::from_utf8_lossy(&o.stderr).contains("qdisc kind is unknown") => return false,
                Ok(o) => panic!("{}: {}", cmd.join(" "), String::from_utf8_lossy(&o.stderr)),
                Err(e) => panic!("{}: {e}", cmd.join(" ")),
            }
        }
        true
    }

    /// Drops `share` of the packets entering and leaving every host (iptables' statistic match).
    pub fn iptables_loss_everywhere(&self, share: f64) {
        let p = format!("{share}");
        for i in 0..self.hosts {
            let ns = self.host_ns(i);
            for chain in ["INPUT", "OUTPUT"] {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "iptables",
                    "-A",
                    chain,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ]);
            }
        }
    }

    /// Drops TCP connections to `ports` on host `i` (its own outgoing connections still work).
    pub fn filter_tcp_ports(&self, i: usize, ports: &[u16]) {
        for p in ports {
            let p = p.to_string();
            let ns = self.host_ns(i);
            sh(&["ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &p, "-j", "DROP"]);
        }
    }

    /// A TCP listener on `port` inside namespace `ns`, made from this process: a socket belongs
    /// to the namespace it was created in, so a thread enters the namespace, creates the socket
    /// and ends.
    pub fn listen_in(ns: &str, port: u16) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind in the namespace")
        })
        .join()
        .expect("the listening thread")
    }

    /// A command run inside namespace `ns`.
    pub fn command(ns: &str, program: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            quiet(&["ip", "netns", "del", &self.host_ns(i)]);
        }
        quiet(&["ip", "netns", "del", &format!("{}d", self.id)]);
        quiet(&["ip", "netns", "del", &self.bridge_ns()]);
        quiet(&["ip", "link", "del", &format!("{}r", self.id)]);
    }
}
