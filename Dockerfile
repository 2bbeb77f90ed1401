# syntax=docker/dockerfile:1
#
# Multi-stage build: dependencies are compiled in their own layer (cargo-chef), so a change to
# the service's code rebuilds only the crate itself; the runtime image holds the binary alone.
#
#   docker build -t video-orchestrator .
#   docker run --rm video-orchestrator config check

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---- chef: the Rust toolchain plus cargo-chef --------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /app

# ---- planner: the dependency recipe (changes only when Cargo.toml / Cargo.lock do) -------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---- builder: dependencies first (cached layer), then the service ------------------------------
FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
# The migrations (sqlx::migrate!) and config/default.toml (include_str!) are compiled into the
# binary, so the runtime image needs neither.
RUN cargo build --release --locked --bin video-orchestrator \
    && strip target/release/video-orchestrator

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS to brokers, databases and providers; curl: container health checks.
# DL3008 (pin apt versions) is ignored on purpose: the base tag fixes the Debian release, whose
# archive keeps only the current point release of each package, so a pinned `curl=…` breaks the
# build at the next security update instead of taking it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /app/target/release/video-orchestrator /usr/local/bin/video-orchestrator
WORKDIR /app
# Numeric ids (the `app` user and group above): a runtime that checks "not root" without reading
# the image's /etc/passwd (Kubernetes runAsNonRoot) can only verify a number.
USER 10001:10001
ENV APP__HTTP__LISTEN=0.0.0.0:8080 \
    APP__LOG__FORMAT=json \
    RUST_LOG=info
EXPOSE 8080
# SIGTERM is the service's stop signal: it stops consuming, finishes in-flight work within
# shutdown.grace_ms (30 s by default) and exits 0. Give it that long (docker stop -t 40).
STOPSIGNAL SIGTERM
# Exec form: no shell in between. Any non-zero exit counts as unhealthy (curl -f: HTTP >= 400).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["video-orchestrator"]
CMD ["serve"]
