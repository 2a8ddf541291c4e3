//! The supervisor with small shell-script children, the way Horust's tests drive its own:
//! real processes, real signals, real reaping. These go through the library because the
//! children are scripts, not Synapse; `appliance.rs` covers the same paths with the binary.
//!
//! Nothing in this test binary may wait for processes itself: the supervisor's reaper is the
//! one owner of waitpid in this process, as in the real one.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use homelab_matrix::supervisor::{
    BackoffPolicy, Child, ChildSpec, Command, Exit, Readiness, RunAs, State, output, run_helper,
};
use nix::sys::signal::Signal;

fn script(dir: &Path, name: &str, body: &str) -> Command {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut c = Command::new("/bin/sh").arg(&p);
    c.cwd = dir.to_owned();
    c
}

fn spec(name: &str, command: Command) -> ChildSpec {
    ChildSpec {
        name: name.into(),
        command,
        readiness: Readiness::Spawned,
        ready_timeout: Duration::from_secs(10),
        stop_signal: Signal::SIGTERM,
        grace: Duration::from_secs(5),
        backoff: BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(800),
            reset_after: Duration::from_secs(60),
        },
        up: None,
    }
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = common::deadline(within);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_child_is_restarted_with_growing_delays_and_flagged_as_a_crash_loop() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("starts");
    // Each start appends a timestamp in ms, then fails.
    let cmd = script(
        d.path(),
        "fail.sh",
        &format!("date +%s%3N >> {}\nexit 3", log.display()),
    );
    let child = Child::start(spec("failer", cmd));
    wait_for("six starts", Duration::from_secs(20), || {
        lines(&log).len() >= 6
    })
    .await;
    let st = child.status();
    child.stop().await;
    let t: Vec<i64> = lines(&log).iter().map(|l| l.parse().unwrap()).collect();
    let gaps: Vec<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    // Delays 100, 200, 400, 800, 800 ms, each jittered by ±25%. Each gap also holds a process
    // start, which a loaded machine makes slower, never faster: so the policy's lower bounds
    // must hold exactly (a backoff that does not grow cannot pass the fourth), the upper ones
    // with room for the load.
    let expect = [100, 200, 400, 800, 800];
    for (g, e) in gaps.iter().zip(expect) {
        assert!(
            *g >= e * 3 / 4 - 5,
            "gap {g} ms below the policy's {e} ms: {gaps:?}"
        );
        assert!(
            *g <= e * 5 / 4 + 600,
            "gap {g} ms far above the policy's {e} ms: {gaps:?}"
        );
    }
    assert!(st.restarts >= 5, "{st:?}");
    assert!(
        st.crash_loop,
        "five failures in a row must flag a crash loop: {st:?}"
    );
    assert_eq!(st.last_exit.as_deref(), Some("exit code 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signals_the_whole_process_group() {
    let d = tempfile::tempdir().unwrap();
    let got = d.path().join("got-term");
    // The child starts a helper of its own; both must hear the stop signal.
    let body = format!(
        "sh -c 'trap \"echo helper >> {g}; exit 0\" TERM; while :; do sleep 0.05; done' &\n\
         trap 'echo main >> {g}; wait; exit 0' TERM\n\
         echo up > {u}\n\
         while :; do sleep 0.05; done",
        g = got.display(),
        u = d.path().join("up").display()
    );
    let child = Child::start(spec("group", script(d.path(), "group.sh", &body)));
    let up = d.path().join("up");
    wait_for("the child to be up", Duration::from_secs(5), || up.exists()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    child.stop().await;
    let mut heard = lines(&got);
    heard.sort();
    assert_eq!(heard, vec!["helper", "main"], "both processes get SIGTERM");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "a clean stop must not wait for the grace period"
    );
    let st = child.status();
    assert_eq!(st.state, State::Stopped);
    assert_eq!(st.last_exit.as_deref(), Some("exit code 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let d = tempfile::tempdir().unwrap();
    let mut s = spec(
        "stubborn",
        script(
            d.path(),
            "stubborn.sh",
            "trap '' TERM\nwhile :; do sleep 0.05; done",
        ),
    );
    s.grace = Duration::from_millis(700);
    let child = Child::start(s);
    wait_for("a pid", Duration::from_secs(5), || {
        child.status().pid.is_some()
    })
    .await;
    let pid = child.status().pid.unwrap();
    let t0 = Instant::now();
    child.stop().await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "killed before the grace period: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        child.status().last_exit.as_deref(),
        Some("killed by SIGKILL")
    );
    assert!(!common::pid_alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_adopted_and_reaped() {
    // The helper leaves a grandchild behind and exits; as a subreaper we inherit it, and the
    // reaper must collect it when it exits, leaving no zombie.
    let out = run_helper(
        Command::new("/bin/sh").arg("-c").arg("sleep 0.3 & echo $!"),
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(out.exit, Exit::Code(0));
    let orphan: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let stat = fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
    if !stat.is_empty() {
        let ppid: i32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            ppid,
            std::process::id() as i32,
            "the orphan was not re-parented to the subreaper"
        );
    }
    wait_for("the orphan to be reaped", Duration::from_secs(5), || {
        !Path::new(&format!("/proc/{orphan}")).exists()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpers_get_stdin_and_their_output_and_exit_code_come_back() {
    let out = run_helper(
        Command::new("/bin/sh")
            .arg("-c")
            .arg("tr a-z A-Z; echo oops >&2; exit 7"),
        b"hello",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(out.exit, Exit::Code(7));
    assert_eq!(out.stdout, b"HELLO");
    assert_eq!(out.stderr, b"oops\n");
    // The environment is exactly what the spec says: nothing of ours leaks in.
    let out = run_helper(Command::new("/usr/bin/env"), b"", Duration::from_secs(5))
        .await
        .unwrap();
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(env.lines().all(|l| l.starts_with("PATH=")), "{env}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_helper_is_killed_at_its_timeout() {
    let t0 = Instant::now();
    let err = run_helper(
        Command::new("/bin/sh").arg("-c").arg("sleep 30"),
        b"",
        Duration::from_millis(500),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("did not finish"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_run_as_their_user_with_its_groups_in_their_own_session() {
    if !common::require("root", common::is_root(), "switching users needs root")
        || !common::require(
            "user matrix-synapse",
            nix::unistd::User::from_name("matrix-synapse")
                .ok()
                .flatten()
                .is_some(),
            "packaging/install-deps creates it",
        )
    {
        return;
    }
    let who = RunAs::lookup("matrix-synapse").unwrap();
    let mut cmd = Command::new("/bin/sh")
        .arg("-c")
        .arg("id -u; id -g; id -G; grep -E '^(Uid|Gid):' /proc/$$/status; cat /proc/$$/stat");
    cmd.run_as = Some(who.clone());
    let out = run_helper(cmd, b"", Duration::from_secs(5)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let l: Vec<&str> = text.lines().collect();
    assert_eq!(l[0], who.uid.to_string());
    assert_eq!(l[1], who.gid.to_string());
    let mut groups: Vec<String> = l[2].split_whitespace().map(String::from).collect();
    groups.sort();
    let mut want: Vec<String> = who.groups.iter().map(|g| g.to_string()).collect();
    want.sort();
    want.dedup();
    assert_eq!(groups, want, "supplementary groups");
    // Real, effective, saved and fs uid all dropped: no way back to root.
    assert!(
        l[3].split_whitespace()
            .skip(1)
            .all(|u| u == who.uid.to_string()),
        "{}",
        l[3]
    );
    // Own session: pid == pgid == sid (fields 1, 5, 6 of /proc/self/stat).
    let stat: Vec<&str> = l[5]
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let pid = l[5].split_whitespace().next().unwrap();
    assert_eq!(stat[2], pid, "own process group");
    assert_eq!(stat[3], pid, "own session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_http_200() {
    // A child that opens its port only after a delay is not "ready" until then.
    let port = common::free_port();
    let d = tempfile::tempdir().unwrap();
    let body = format!(
        "sleep 1\nexec /usr/bin/python3 -c \"import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n  def do_GET(s):\n    s.send_response(200 if s.path=='/health' else 404); s.end_headers(); s.wfile.write(b'OK')\nh.HTTPServer(('127.0.0.1',{port}),H).serve_forever()\""
    );
    let mut s = spec("web", script(d.path(), "web.sh", &body));
    s.readiness = Readiness::HttpGet {
        port,
        path: "/health".into(),
    };
    let t0 = Instant::now();
    let child: Arc<Child> = Child::start(s);
    child.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "ready before the port was open"
    );
    assert_eq!(child.status().state, State::Running);
    child.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_writing_invalid_utf8_and_an_endless_line_keeps_running_and_logging() {
    common::capture::install();
    let d = tempfile::tempdir().unwrap();
    let written = d.path().join("written");
    // Raw bytes, then a 1 MiB line, then ordinary lines on both pipes, then idling: what a
    // C child (coturn) or a broken Python extension may do.
    let body = format!(
        "printf 'before \\377\\376 bad\\n'\n\
         head -c 1048576 /dev/zero | tr '\\000' x\n\
         printf '\\nafter one\\n'\n\
         printf '2026-01-01 - synapse.x - 1 - WARNING - after two\\n' >&2\n\
         printf 'last, without a newline'\n\
         echo done > {w}\n\
         exec sleep 60",
        w = written.display()
    );
    let child = Child::start(spec("garbage", script(d.path(), "garbage.sh", &body)));
    wait_for(
        "the script to write everything",
        Duration::from_secs(20),
        || written.exists(),
    )
    .await;
    wait_for(
        "the later lines to be logged",
        Duration::from_secs(10),
        || {
            let ev = common::capture::of_child("garbage");
            ev.iter().any(|e| e.message == "after one")
                && ev.iter().any(|e| e.message.ends_with("after two"))
        },
    )
    .await;
    let events = common::capture::of_child("garbage");
    let lines: Vec<&str> = events
        .iter()
        .map(|e| e.message.as_str())
        .filter(|m| !matches!(*m, "started" | "ready"))
        .collect();
    assert_eq!(lines[0], "before \u{fffd}\u{fffd} bad", "{lines:?}");
    // The long line: logged once, cut at the cap, marked; its rest dropped, not buffered.
    let long: Vec<&&str> = lines.iter().filter(|l| l.starts_with('x')).collect();
    assert_eq!(long.len(), 1, "one cut line, not 1 MiB of pieces");
    assert_eq!(
        long[0].len(),
        output::MAX_LINE + output::CUT_MARKER.len(),
        "the long line is cut at the cap"
    );
    assert!(long[0].ends_with(output::CUT_MARKER));
    // Python's level names still map (the stderr line is a warning).
    let two = events
        .iter()
        .find(|e| e.message.ends_with("after two"))
        .unwrap();
    assert_eq!(two.level, tracing::Level::WARN);
    // The child is alive and running: it never wrote into a closed pipe.
    let st = child.status();
    assert_eq!(st.state, State::Running, "{st:?}");
    assert_eq!(st.restarts, 0, "{st:?}");
    assert!(common::pid_alive(st.pid.unwrap()));
    child.stop().await;
    // The last line had no newline: it comes out at EOF.
    wait_for("the unterminated last line", Duration::from_secs(5), || {
        common::capture::of_child("garbage")
            .iter()
            .any(|e| e.message == "last, without a newline")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_cannot_gain_privileges() {
    // PR_SET_NO_NEW_PRIVS: a set-uid binary run by a compromised child does not make it root.
    let out = run_helper(
        Command::new("/bin/grep")
            .arg("NoNewPrivs")
            .arg("/proc/self/status"),
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "NoNewPrivs:\t1"
    );
}

/// The supervisor raises its own open-file limit for its connections (`fdlimit::raise`);
/// a child gets the limit the process started with, as systemd would have given it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_get_the_open_file_limit_the_supervisor_started_with() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard > 1024, "this test needs a hard limit above 1024");
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    assert_eq!(homelab_matrix::fdlimit::raise(), hard);
    assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    let out = run_helper(
        Command::new("/bin/sh")
            .arg("-c")
            .arg("ulimit -Sn; ulimit -Hn"),
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1024\n{hard}\n")
    );
}
