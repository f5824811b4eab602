//! Nchan, the reference: finding (or installing) Debian's nginx and its Nchan module, and writing
//! an nginx configuration under a temporary prefix that mirrors nudge's routes.
//!
//! The configuration is the one a careful operator would write for long-polls: one `location =
//! /sub` subscriber (`longpoll`, channel from `?channel=`, a 600 s timeout like nudge's
//! `--retry-timeout 600s`, `first_message newest` so that a poll waits for the next publish as
//! nudge's does), a publisher on a second listener (like nudge's internal one), a message buffer of
//! one message, no access log, and enough connections and files for 18,000 polls per worker.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where nginx and the Nchan module are.
#[derive(Clone, Debug)]
pub struct NchanInstall {
    pub nginx: PathBuf,
    pub module: PathBuf,
}

const MODULE_PATHS: &[&str] = &[
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
];
const NGINX_PATHS: &[&str] = &["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"];

fn find() -> Option<NchanInstall> {
    let module = std::env::var_os("NUDGE_BENCH_NCHAN_MODULE")
        .map(PathBuf::from)
        .or_else(|| MODULE_PATHS.iter().map(PathBuf::from).find(|p| p.exists()))?;
    let nginx = std::env::var_os("NUDGE_BENCH_NGINX")
        .map(PathBuf::from)
        .or_else(|| NGINX_PATHS.iter().map(PathBuf::from).find(|p| p.exists()))?;
    (module.exists() && nginx.exists()).then_some(NchanInstall { nginx, module })
}

/// Finds nginx and the Nchan module, installing Debian's packages when they are missing and
/// `install` allows it (apt-get, as root).
pub fn find_or_install(install: bool) -> Result<NchanInstall, String> {
    if let Some(found) = find() {
        return Ok(found);
    }
    if !install {
        return Err(
            "nginx with libnginx-mod-nchan is not installed (NUDGE_BENCH_NCHAN_INSTALL=0)".into(),
        );
    }
    eprintln!("bench: installing nginx and libnginx-mod-nchan with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    };
    // The module depends on the nginx ABI it was built for, so apt picks the matching nginx.
    let installed = apt(&["update", "-qq"])
        && apt(&[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "nginx",
            "libnginx-mod-nchan",
        ]);
    match find() {
        Some(found) if installed => Ok(found),
        _ => {
            Err("could not install nginx and libnginx-mod-nchan with apt-get (root needed)".into())
        }
    }
}

/// nginx's version line, for the report (`nginx version: nginx/1.22.1`).
pub fn version(install: &NchanInstall) -> String {
    Command::new(&install.nginx)
        .arg("-v")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
        .unwrap_or_default()
}

/// A configuration written and ready to start.
pub struct Setup {
    pub prefix: PathBuf,
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

/// A port the kernel reports free right now. nginx cannot bind port 0 and tell us what it got,
/// so the bench asks the kernel for a free port and hands it to nginx; the window in which
/// another process could take it is a few milliseconds on a machine running only this bench.
fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

/// Writes a configuration for `workers` nginx workers under a new temporary prefix.
pub fn prepare(install: &NchanInstall, workers: u32) -> Result<Setup, String> {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let prefix = std::env::temp_dir().join(format!(
        "nudge-bench-nchan-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(prefix.join("temp"))
        .map_err(|e| format!("{}: {e}", prefix.display()))?;
    let public = free_port()?;
    let internal = free_port()?;
    let config = config(&install.module, &prefix, workers, public, internal);
    std::fs::write(prefix.join("nginx.conf"), config).map_err(|e| format!("nginx.conf: {e}"))?;
    Ok(Setup {
        prefix,
        public,
        internal,
    })
}

/// The nginx configuration.
fn config(
    module: &Path,
    prefix: &Path,
    workers: u32,
    public: SocketAddr,
    internal: SocketAddr,
) -> String {
    let module = module.display();
    let prefix = prefix.display();
    // With more than one worker, `reuseport` gives each worker its own accept queue and lets the
    // kernel spread connections evenly; without it one worker may take most of them.
    let reuseport = if workers > 1 { " reuseport" } else { "" };
    format!(
        r#"# Written by nudge's long-poll benchmark (benches/longpoll/nchan.rs).
load_module {module};
daemon off;
master_process on;
# Run as whoever starts the bench (root is kept as root, so the temp paths stay writable).
user root;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 20000;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/temp/body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256m;

    # Public: what clients poll.
    server {{
        listen {public} backlog=4096{reuseport};
        location = /sub {{
            nchan_subscriber longpoll;
            nchan_channel_id $arg_channel;
            nchan_subscriber_timeout 600s;
            nchan_subscriber_first_message newest;
        }}
        # One private channel per client plus the shared one (the "one channel each" layout).
        location = /sub_multi {{
            nchan_subscriber longpoll;
            nchan_channel_id $arg_channel $arg_own;
            nchan_subscriber_timeout 600s;
            nchan_subscriber_first_message newest;
        }}
        # Answered at once with the stored message: the connection-rate test.
        location = /sub_now {{
            nchan_subscriber longpoll;
            nchan_channel_id $arg_channel;
            nchan_subscriber_timeout 10s;
            nchan_subscriber_first_message oldest;
        }}
    }}

    # Internal: publishing and counters, as nudge's internal listener.
    server {{
        listen {internal} backlog=4096;
        location = /pub {{
            nchan_publisher;
            nchan_channel_id $arg_channel;
            nchan_message_buffer_length 1;
            nchan_message_timeout 5m;
        }}
        location = /status {{
            nchan_stub_status;
        }}
    }}
}}
"#
    )
}
