# Multi-stage: build a release binary, ship it in a small non-root image.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
# The workspace's manifests: bench/ is a member (the load generator), so its
# manifest must exist for cargo to load the workspace, though it is not built.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/
RUN mkdir -p src benches bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && echo 'fn main() {}' > benches/hot_paths.rs \
    && touch src/lib.rs \
    && cargo build --release --locked -p postline --bin postline \
    && rm -rf src benches bench/src
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p postline --bin postline

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home postline
COPY --from=build /src/target/release/postline /usr/local/bin/postline
USER postline
ENV POSTLINE_LISTEN=0.0.0.0:8080 RUST_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
# SIGTERM drains: reconnect notices, persist buffer flushed, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["postline"]
CMD ["serve", "--no-migrate"]
