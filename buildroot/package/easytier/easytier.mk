################################################################################
#
# easytier
#
################################################################################

EASYTIER_VERSION = 2.6.4
EASYTIER_SITE = $(call github,EasyTier,EasyTier,v$(EASYTIER_VERSION))
EASYTIER_LICENSE = LGPL-3.0
EASYTIER_LICENSE_FILES = LICENSE

# Build scripts compile .proto files with prost-build (needs protoc).
EASYTIER_DEPENDENCIES = host-protobuf
EASYTIER_CARGO_ENV = PROTOC=$(HOST_DIR)/bin/protoc

# The workspace also holds the Tauri GUI, the web console and FFI crates:
# build only the two binaries of the `easytier` crate. The default feature
# set minus `kcp`, whose kcp-sys build runs bindgen and would need libclang
# on the host; KCP proxying is optional and meduza does not configure it.
EASYTIER_CARGO_BUILD_OPTS = \
	--package easytier --bin easytier-core --bin easytier-cli \
	--no-default-features \
	--features wireguard,websocket,smoltcp,tun,socks5,quic,faketcp,magic-dns,zstd

# Upstream's .cargo/config.toml forces mold as linker for *-linux-gnu; the
# vendoring step replaces that file with the vendor configuration, so the
# Buildroot cross linker is used.

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
