################################################################################
#
# meduza
#
################################################################################

# Built from this very repository: the BR2_EXTERNAL tree sits in buildroot/.
MEDUZA_VERSION = 0.1.0
MEDUZA_SITE = $(BR2_EXTERNAL_MEDUZA_PATH)/..
MEDUZA_SITE_METHOD = local
MEDUZA_LICENSE = Apache-2.0

# Do not copy build outputs and test scratch space into the build dir.
MEDUZA_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /target --exclude '/target-*' --exclude /tests/qemu/build \
	--exclude /fuzz/target --exclude /fuzz/corpus --exclude /fuzz/artifacts

# etcd-client's build script runs prost-build, which needs protoc.
MEDUZA_DEPENDENCIES = host-protobuf
MEDUZA_CARGO_ENV = PROTOC=$(HOST_DIR)/bin/protoc

# The workspace root holds two packages (meduza, meduza-generators): build
# only the agent binary.
MEDUZA_CARGO_BUILD_OPTS = --package meduza --bin meduza

# A local package is rsynced, not downloaded, so the cargo download
# post-process (vendoring) never runs for it. Vendor here instead, once
# host-rustc exists, with the same CARGO_HOME as the download step so the
# crate cache is shared; the build then runs --offline as for any
# cargo-package.
define MEDUZA_CARGO_VENDOR
	mkdir -p $(@D)/.cargo $(BR_CARGO_HOME)
	cd $(@D) && $(HOST_MAKE_ENV) CARGO_HOME=$(BR_CARGO_HOME) \
		flock $(BR_CARGO_HOME)/.br-lock \
		cargo vendor --locked VENDOR > $(@D)/.cargo/config.toml
endef
MEDUZA_PRE_CONFIGURE_HOOKS += MEDUZA_CARGO_VENDOR

# `cargo install --path ./` would rebuild; install the binary just built.
define MEDUZA_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 \
		$(@D)/target/$(RUSTC_TARGET_NAME)/$(if $(BR2_ENABLE_DEBUG),debug,release)/meduza \
		$(TARGET_DIR)/usr/bin/meduza
	$(INSTALL) -d -m 0700 $(TARGET_DIR)/var/lib/meduza
endef

# Kernel options the data plane needs; the board fragment
# (board/meduza/linux-meduza.fragment) carries the same list for boards
# whose kernel is not configured through these fixups.
define MEDUZA_LINUX_CONFIG_FIXUPS
	$(call KCONFIG_ENABLE_OPT,CONFIG_NETFILTER)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NETFILTER_ADVANCED)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NF_TABLES)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NF_TABLES_INET)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NFT_TPROXY)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NFT_SOCKET)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NFT_FIB_INET)
	$(call KCONFIG_ENABLE_OPT,CONFIG_IP_ADVANCED_ROUTER)
	$(call KCONFIG_ENABLE_OPT,CONFIG_IP_MULTIPLE_TABLES)
	$(call KCONFIG_ENABLE_OPT,CONFIG_IPV6_MULTIPLE_TABLES)
	$(call KCONFIG_ENABLE_OPT,CONFIG_TUN)
	$(call KCONFIG_ENABLE_OPT,CONFIG_WIREGUARD)
endef

$(eval $(cargo-package))
