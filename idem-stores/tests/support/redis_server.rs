//! Private `redis-server` processes for tests: one server on a spare loopback port (that a
//! test can kill and restart on the same port), or a three-master Redis Cluster.
//!
//! The server binary is `IDEM_TEST_REDIS_SERVER` when set (e.g. a `valkey-server`, to run the
//! same tests on Valkey), else `redis-server` from `PATH`.
//!
//! Each server runs under a small `sh` watchdog that kills it when the test process exits,
//! so a panicking test or a static that is never dropped leaves no server behind.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The server binary private servers run: `IDEM_TEST_REDIS_SERVER`, else `redis-server`.
pub fn server_binary() -> String {
    std::env::var("IDEM_TEST_REDIS_SERVER")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "redis-server".into())
}

/// True when `redis-server` (or `IDEM_TEST_REDIS_SERVER`) and `redis-cli` can be run. When they cannot and `CI` is set,
/// panics (backend tests must not skip in CI); otherwise prints why and returns false.
pub fn available() -> bool {
    let ok = [server_binary().as_str(), "redis-cli"].iter().all(|bin| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server/redis-cli are not installed, and CI is set: tests must not skip"
        );
        println!("skipped: redis-server is not installed");
    }
    ok
}

/// A port on 127.0.0.1 that is free now (and, with `bus`, whose cluster bus port +10000 is
/// free too).
pub fn spare_port(bus: bool) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a spare port");
        let port = l.local_addr().expect("local addr").port();
        if !bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no spare port found");
}

/// One private `redis-server`.
pub struct RedisServer {
    binary: String,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    watchdog: Option<Child>,
}

impl RedisServer {
    /// Starts a server (no persistence) on a spare port.
    pub fn start() -> Self {
        Self::start_with(spare_port(false), &[])
    }

    /// Starts a server on `port` with extra `redis-server` arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        Self::start_binary(&server_binary(), port, extra)
    }

    /// Starts `binary` (a `redis-server` or `valkey-server`) on `port` with extra arguments.
    pub fn start_binary(binary: &str, port: u16, extra: &[&str]) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "idem-redis-test-{}-{port}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let mut s = RedisServer {
            binary: binary.to_string(),
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            watchdog: None,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        // The watchdog: run the server, and kill it once the test process is gone.
        let script = format!(
            "'{binary}' \"$@\" & S=$!; \
             while kill -0 {parent} 2>/dev/null && kill -0 $S 2>/dev/null; do sleep 0.2; done; \
             kill -9 $S 2>/dev/null; \
             kill -0 {parent} 2>/dev/null || rm -rf '{dir}'",
            binary = self.binary,
            parent = std::process::id(),
            dir = self.dir.display()
        );
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--logfile".into(),
            self.dir.join("redis.log").display().to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.watchdog = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start; log: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one inline command and returns its reply: a status, error or integer line, or
    /// the contents of a bulk string (tests only; arrays are not decoded).
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        if let Some(len) = line.strip_prefix('$') {
            let len: i64 = len.trim().parse().ok()?;
            if len < 0 {
                return Some(String::new());
            }
            let mut body = vec![0u8; len as usize + 2];
            r.read_exact(&mut body).ok()?;
            body.truncate(len as usize);
            return Some(String::from_utf8_lossy(&body).into_owned());
        }
        Some(line)
    }

    /// True when the server answers PING.
    pub fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    fn pid(&self) -> Option<u32> {
        let info = self.command("INFO server")?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "redis-server did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.launch();
    }

    /// Starts another server binary on the same port and directory (after
    /// [`kill`](Self::kill)): an upgrade in place, loading the `dump.rdb` a `SAVE` left.
    pub fn restart_binary(&mut self, binary: &str) {
        self.binary = binary.to_string();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            self.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas) on spare loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `--cluster-enabled` servers, joins them with `redis-cli --cluster create`,
    /// and waits until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        Self::start_binary(&server_binary())
    }

    /// A cluster of `binary` servers (`redis-server` or `valkey-server`).
    pub fn start_binary(binary: &str) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = spare_port(true);
            let conf = format!("nodes-{port}.conf");
            nodes.push(RedisServer::start_binary(
                binary,
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "5000",
                ],
            ));
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = nodes.iter().all(|n| {
                n.command("CLUSTER INFO")
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}
