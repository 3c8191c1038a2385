################################################################################
#
# easytier
#
################################################################################

# The version meduza's generator writes for (model::EASYTIER_VERSION) and its tests
# run (scripts/easytier-path builds the same crate): EasyTier 2.0.3 is the release
# published on crates.io, fetched here as the crate archive.
EASYTIER_VERSION = 2.0.3
EASYTIER_SOURCE = easytier-$(EASYTIER_VERSION).crate
EASYTIER_SITE = https://static.crates.io/crates/easytier
EASYTIER_LICENSE = Apache-2.0
EASYTIER_LICENSE_FILES = LICENSE

# Build scripts compile .proto files with prost-build (needs protoc).
EASYTIER_DEPENDENCIES = host-protobuf
EASYTIER_CARGO_ENV = PROTOC=$(HOST_DIR)/bin/protoc

# A .crate is a gzip'd tar with one top directory; Buildroot does not know the
# suffix, so extract it by hand.
define EASYTIER_EXTRACT_CMDS
	$(TAR) -xzf $(EASYTIER_DL_DIR)/$(EASYTIER_SOURCE) --strip-components=1 -C $(@D)
endef

# The crate's two binaries with its default features (wireguard, mimalloc,
# websocket, smoltcp, tun, socks5): the set the tests' build uses.
EASYTIER_CARGO_BUILD_OPTS = --bin easytier-core --bin easytier-cli

define EASYTIER_INSTALL_TARGET_CMDS
	$(foreach b,easytier-core easytier-cli,\
		$(INSTALL) -D -m 0755 \
			$(@D)/target/$(RUSTC_TARGET_NAME)/$(if $(BR2_ENABLE_DEBUG),debug,release)/$(b) \
			$(TARGET_DIR)/usr/bin/$(b)
	)
endef

# See easytier.hash: the vendored tarball's hash is not recorded yet.
BR_NO_CHECK_HASH_FOR += $(EASYTIER_SOURCE)

define EASYTIER_LINUX_CONFIG_FIXUPS
	$(call KCONFIG_ENABLE_OPT,CONFIG_TUN)
endef

$(eval $(cargo-package))
