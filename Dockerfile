# The ces image: `ces controller` (BIG-IP) and `ces gateway` (nftables) in one binary.
# Not built in this repository's CI (there is no container engine on its machines); build it with
#   docker build -t ces:0.1.0 .
# The official AS3 schema files are fetched from F5's repository at build time (pinned commit) into
# /usr/share/ces/as3-schema, where the controller validates every declaration before sending it.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ces && cp target/release/ces /ces

FROM docker.io/library/debian:bookworm-slim AS schema
ARG AS3_COMMIT=b44d5a039cb95df31cc94408329c27dbd17d47bf
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /as3-schema && cd /as3-schema && for v in 3.28.0/as3-schema-3.28.0-3 3.29.0/as3-schema-3.29.0-3 3.56.0/as3-schema-3.56.0-10; do \
      curl -fsSL -o "$(basename $v).json" "https://raw.githubusercontent.com/F5Networks/f5-appsvcs-extension/${AS3_COMMIT}/schema/${v}.json"; \
    done

FROM docker.io/library/debian:bookworm-slim
# nftables and iproute2 for `ces gateway`; ca-certificates for the BIG-IP's TLS.
RUN apt-get update && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /ces /usr/local/bin/ces
COPY --from=schema /as3-schema /usr/share/ces/as3-schema
ENV CES_AS3_SCHEMA_DIR=/usr/share/ces/as3-schema
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ces"]
CMD ["--help"]
