# The operator image: one binary, the subcommand picks the role
# (`controller` or `sidecar`; the Helm chart passes it as the container args).
#
#   docker build -t openmeet-matrix-operator:0.3.0 .

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: built against stub sources, so an
# edit under src/ does not rebuild every crate. The manifest names explicit
# test and bench targets, which must exist for cargo to read it.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/integration benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > tests/integration/main.rs \
 && echo 'fn main() {}' > benches/converge.rs \
 && cargo build --release --locked --bin openmeet-matrix-operator \
 && cargo clean --release --package openmeet-matrix-operator \
 && rm -rf src

# The real sources (docs/ is compiled in: the sidecar serves its OpenAPI file).
COPY src ./src
COPY docs ./docs
RUN cargo build --release --locked --bin openmeet-matrix-operator \
 && ./target/release/openmeet-matrix-operator --version

# ---- runtime ----------------------------------------------------------------
# distroless/cc: glibc and libgcc only (the binary links glibc dynamically;
# TLS is rustls with ring, no OpenSSL), no shell, no package manager.
# Pinned by digest, so a rebuild of the same source gets the same base. To
# take a newer base (security updates), look the tag's digest up and replace
# it here, in its own commit:
#   crane digest gcr.io/distroless/cc-debian12:nonroot
#   (or: docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot)
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=builder /build/target/release/openmeet-matrix-operator /usr/local/bin/openmeet-matrix-operator
# 65532 = nonroot. The binary writes nothing to disk: a read-only root
# filesystem works as is.
USER 65532:65532
EXPOSE 8081 8082 8443 9000
ENTRYPOINT ["/usr/local/bin/openmeet-matrix-operator"]
