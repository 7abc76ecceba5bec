# syntax=docker/dockerfile:1
# The one weft image: `weft agent`, `weft ca`, `weft cni install|uninstall`, the chained CNI
# plugin (the same binary, copied to the node as weft-cni) and the uninstall hook all run it.
#
#   docker build -t <registry>/weft:<tag> .
#
# Stage 1 builds what `cargo xtask setup` installs on a developer machine (xtask/src/setup.rs):
# LLVM 22 (bpf-linker links against it), the nightly toolchain with rust-src (the eBPF object
# is built with build-std for bpfel-unknown-none) and bpf-linker; then agent/build.rs builds
# the eBPF object and the agent embeds it. Stage 2 is the binary on a slim Debian 12.

# The workspace's stable toolchain (rust-toolchain.toml), on Debian 12 like CI.
FROM rust:1.95.0-bookworm AS build

# LLVM 22 comes from bookworm's security/updates suites, which the base image has enabled.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*

RUN rustup toolchain install nightly --profile minimal --component rust-src

# bpf-linker finds LLVM through llvm-config on PATH: LLVM 22's must come first.
RUN PATH="/usr/lib/llvm-22/bin:$PATH" \
    cargo install --locked bpf-linker --no-default-features --features llvm-22

WORKDIR /src
# The whole workspace: agent/build.rs needs ebpf/, and the lockfile pins every crate.
COPY . .
# rust-toolchain.toml selects 1.95.0 inside /src; rustup installs it if the image's differs.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft \
 && install -D -m 0755 target/release/weft /out/weft

# Runtime: glibc (the agent is linked against it), CA certificates for the API server's
# chain, and bpftool so that `kubectl exec ... -- bpftool map dump pinned ...` works in the
# agent pod (docs/kubernetes.md, Debugging).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates bpftool \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/weft /usr/local/bin/weft
# Non-root by default; the chart runs the agent and the CNI installer as root (host files,
# capabilities) and the CA as this user.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft"]
CMD ["--help"]
