# syntax=docker/dockerfile:1
# energy-stream image: `run` by default; `produce`, `migrate`, `check`,
# `verify`, ... with another command. Built by docker-compose.yml.
#
# Build and runtime are both Debian bookworm, so the binary's glibc and
# OpenSSL match the runtime's. cargo-chef caches the dependency build (the
# slow part: DataFusion, librdkafka) in its own layer, rebuilt only when
# Cargo.toml / Cargo.lock change.

# Pinned, not `1`: a moving tag stays at whatever copy a machine cached, and
# an old cached `rust:1-bookworm` cannot build edition 2024 (Cargo.toml's
# rust-version is 1.94). Checked with 1.95.0.
ARG RUST_VERSION=1.95

# ---- chef: the toolchain, cargo-chef and the C build deps of the -sys crates
FROM rust:${RUST_VERSION}-bookworm AS chef
# rdkafka-sys builds the bundled librdkafka with its own configure + make
# (no cmake: the cmake-build feature is off); openssl-sys and libz-sys link
# the system libssl and zlib through pkg-config.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      make g++ pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked
# Cargo.toml keeps line tables in release builds, for profiling; the image
# does without them (they are about 570 MB of the 700 MB binary). Set here, so
# that `cargo chef cook` and `cargo build` build the dependencies alike.
ENV CARGO_PROFILE_RELEASE_DEBUG=false
WORKDIR /src

# ---- planner: the dependency recipe
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---- builder: dependencies (cached), then the binary
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
# sql/ is compiled in (include_str!), so it is part of the context.
RUN cargo build --release --bin energy-stream \
 && cp target/release/energy-stream /usr/local/bin/energy-stream

# ---- runtime
FROM debian:bookworm-slim AS runtime
# The binary links libssl3, libcrypto (libssl3), libz (zlib1g), libgcc_s,
# libm and libc; ca-certificates for TLS to Kafka or Postgres.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 energy \
 && useradd --system --uid 10001 --gid energy --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin energy
WORKDIR /app
COPY --from=builder /usr/local/bin/energy-stream /usr/local/bin/energy-stream
# queries/: the KPI files `run` computes (./queries is the default);
# data/: the sample events `produce` replays; sql/: the migrations, for reference.
COPY queries/ /app/queries/
COPY data/ /app/data/
COPY sql/ /app/sql/
# /app and its files stay root-owned and read-only to the process.
USER 10001:10001
# /metrics, /healthz and /readyz on every interface of the container (the
# binary's default is loopback only). `produce` serves them here as well.
ENV METRICS_ADDR=0.0.0.0:9898
EXPOSE 9898
ENTRYPOINT ["energy-stream"]
CMD ["run"]
