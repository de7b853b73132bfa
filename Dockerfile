# The runcast image: one static binary with every role (gateway, operator,
# worker, tail, doctor, ...), on a distroless base, as a non-root user with
# a read-only root filesystem (the Helm chart sets readOnlyRootFilesystem).
#   docker build -t runcast .
# Not built in CI here (no container engine on these machines).

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# rustls with ring and no OpenSSL: a fully static musl binary.
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p runcast-cli \
    && cp target/x86_64-unknown-linux-musl/release/runcast /runcast

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /runcast /usr/local/bin/runcast
# 65532 is distroless's "nonroot"; the chart runs as the same IDs.
USER 65532:65532
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/runcast"]
CMD ["gateway"]
