# Multi-stage build: compile with cargo in the official Rust image, run in distroless/cc as a
# non-root user. Not built in CI (no Docker engine there); see README.
FROM rust:1.95-bookworm AS build
# protoc: the etcd client compiles etcd's gRPC API at build time.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin pgmtls \
 && install -D -m 0755 target/release/pgmtls /out/pgmtls

# distroless/cc has glibc and libgcc (aws-lc's C code needs them) and nothing else: no shell,
# so no HEALTHCHECK command can run inside it; orchestrators probe /healthz and /readyz instead.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/pgmtls /usr/local/bin/pgmtls
# The gateway profile: admin on 0.0.0.0:9480 so probes and Prometheus can reach it.
COPY config/gateway.yaml /etc/pgmtls/pgmtls.yaml
# 5433: the example database listener; 9480: admin (/metrics, /healthz, /readyz, /status).
EXPOSE 5433 9480
USER nonroot:nonroot
ENTRYPOINT ["pgmtls"]
CMD ["serve", "--config", "/etc/pgmtls/pgmtls.yaml"]
