# syntax=docker/dockerfile:1.7
# Two images from one build: the API node and the schema migrator/operator.
#   docker build --target wallet          -t wallet:0.1.0 .
#   docker build --target wallet-migrator -t wallet-migrator:0.1.0 .
# Dependencies are compiled in their own layer (cargo-chef), so a source change rebuilds
# only the workspace crates; BuildKit cache mounts keep the crate downloads across builds.
#
# Build arguments (the defaults are the registry images above):
#   RUST_IMAGE     the builder's base (cargo, rustc)
#   RUNTIME_IMAGE  the base of both runtime stages
#   BINARIES       builder (default): compile in the builder stage;
#                  prebuilt: take wallet and wallet-migrator from the build context's root,
#                  for machines whose build stages cannot get a Rust toolchain (no registry):
#     podman build --build-arg BINARIES=prebuilt --build-arg RUNTIME_IMAGE=localhost/debian:bookworm \
#       --target wallet -f Dockerfile <folder holding only the two release binaries>
#   (scripts/images.sh does this; the runtime stages are the same in both modes.)

ARG RUST_VERSION=1.95
# The builder and the runtime share a Debian release, so the glibc the binaries link
# against is the one they run with.
ARG DEBIAN_RELEASE=bookworm
ARG RUST_IMAGE=rust:${RUST_VERSION}-${DEBIAN_RELEASE}
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARIES=builder

FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# No query! macros may reach for a database while compiling in the image.
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY --from=planner /src/recipe.json recipe.json
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo build --release --locked -p wallet -p wallet-migrator --bins \
 && mkdir -p /out \
 && cp target/release/wallet target/release/wallet-migrator /out/

# Where the runtime stages take the binaries from: one of these two, by BINARIES. An
# unused stage is skipped, so the prebuilt mode never needs RUST_IMAGE. podman/buildah 1.28
# pick the stage from --build-arg values only, not from the default above: pass
# --build-arg BINARIES=... explicitly there (scripts/images.sh does).
FROM scratch AS binaries-builder
COPY --from=builder /out/ /out/
FROM scratch AS binaries-prebuilt
COPY wallet wallet-migrator /out/
FROM binaries-${BINARIES} AS binaries

# Migrator: `apply`, `status`, `wait`, `operator`, `crd`. The migrations are compiled in.
FROM ${RUNTIME_IMAGE} AS wallet-migrator
COPY --from=binaries /out/wallet-migrator /usr/local/bin/wallet-migrator
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/wallet-migrator"]
CMD ["operator"]

# API node (the default target). It carries wallet-migrator too, so `wallet-migrator wait`
# can also run from this image.
FROM ${RUNTIME_IMAGE} AS wallet
COPY --from=binaries /out/wallet /out/wallet-migrator /usr/local/bin/
USER 65532:65532
# public API, internal (node-to-node), admin (/healthz, /readyz, /metrics, /cluster)
EXPOSE 8080 8090 9090
ENTRYPOINT ["/usr/local/bin/wallet"]
