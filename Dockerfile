# syntax=docker/dockerfile:1.7
# Two images from one build: the API node and the schema migrator/operator.
#   docker build --target wallet          -t wallet:0.1.0 .
#   docker build --target wallet-migrator -t wallet-migrator:0.1.0 .
# Dependencies are compiled in their own layer (cargo-chef), so a source change rebuilds
# only the workspace crates; BuildKit cache mounts keep the crate downloads across builds.

ARG RUST_VERSION=1.95
# The builder and the runtime share a Debian release, so the glibc the binaries link
# against is the one they run with.
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
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

# Migrator: `apply`, `status`, `wait`, `operator`, `crd`. The migrations are compiled in.
FROM ${RUNTIME_IMAGE} AS wallet-migrator
COPY --from=builder /out/wallet-migrator /usr/local/bin/wallet-migrator
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/wallet-migrator"]
CMD ["operator"]

# API node (the default target). It carries wallet-migrator too, so `wallet-migrator wait`
# can also run from this image.
FROM ${RUNTIME_IMAGE} AS wallet
COPY --from=builder /out/wallet /out/wallet-migrator /usr/local/bin/
USER 65532:65532
# public API, internal (node-to-node), admin (/healthz, /readyz, /metrics, /cluster)
EXPOSE 8080 8090 9090
ENTRYPOINT ["/usr/local/bin/wallet"]
