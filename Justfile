# Entry points. `just image` builds foobar.qcow2; `just test` runs the tests; both install what is missing.

set shell := ["bash", "-euo", "pipefail", "-c"]

e2e_flag := if env_var_or_default("FOOBAR_E2E", "") == "1" { "--include-ignored" } else { "" }
cluster_flag := if env_var_or_default("FOOBAR_CLUSTER", "") == "1" { "--include-ignored" } else { "" }

# Install the Debian packages the build and the tests need (idempotent)
deps:
    scripts/deps.sh

# Run every test; the QEMU tier too when FOOBAR_E2E=1 (see `just e2e`), the cluster tier too when FOOBAR_CLUSTER=1
# (as root; each is ignored otherwise, and reported so). The cluster tier runs last and alone: its failover figures
# must not share the CPU with builds.
test: deps
    cargo build --workspace
    cargo build --release --workspace
    status=0; \
    cargo test --workspace --no-fail-fast -- {{ e2e_flag }} --skip cluster_tier:: || status=$?; \
    cargo test -p foobar-tests --test it -- {{ cluster_flag }} --nocapture --test-threads=1 cluster_tier:: || status=$?; \
    exit $status

# Load-test the agent against a real MariaDB on this machine: requests/s and p99, median of 3 runs
bench-agent: deps
    cargo build --release -p foobar-agent
    scripts/bench-agent.sh

# Measure the image: cold and warm build, size, first and second boot-to-ready, requests/s through nginx in a guest
bench: deps
    cargo build --release --workspace
    scripts/bench.sh

# Build foobar.qcow2 from this repository
image: deps
    cargo build --release --workspace
    target/release/imagebuild --out foobar.qcow2

# Build the image, then boot it in QEMU (http://127.0.0.1:8080/, Host: www.foobar.com)
boot: image
    target/release/imagebuild boot foobar.qcow2 --port 8080

# Every test including the QEMU tier (builds and boots the image; minutes)
e2e:
    FOOBAR_E2E=1 just test

# Build the example cluster's image and boot its seven nodes in QEMU (as root): `imagebuild cluster status|down` after
cluster: deps
    cargo build --release --workspace
    target/release/imagebuild --config examples/cluster/foobar.toml --out foobar-cluster.qcow2
    target/release/imagebuild cluster up examples/cluster/cluster.toml --image foobar-cluster.qcow2 --hold app3

# The cluster tier alone: builds the example cluster's image, brings it up and cuts nodes under load (as root; ~20 minutes)
cluster-test: deps
    cargo build --workspace
    cargo build --release --workspace
    cargo test -p foobar-tests --test it -- --include-ignored --nocapture --test-threads=1 cluster_tier::
