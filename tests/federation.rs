//! Federation between two appliances on two "hosts" (network namespaces; tests/common/twohost.rs).
// The test drives the binary and curl from outside, with std's process API.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Instant;

use common::require_appliance;
use common::twohost::TwoHost;

#[test]
fn two_hosts_start_and_see_each_other() {
    if !require_appliance() {
        return;
    }
    let t0 = Instant::now();
    let pair = TwoHost::started("fedsmoke");
    eprintln!("both READY after {:?}", t0.elapsed());
    let out = pair
        .b
        .exec("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(pair.b.lab.path("peer-ca.pem"))
        .arg("https://a.test:8448/_matrix/federation/v1/version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Synapse"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
