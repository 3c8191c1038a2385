# Meduza BR2_EXTERNAL tree: pull in every package's .mk.
include $(sort $(wildcard $(BR2_EXTERNAL_MEDUZA_PATH)/package/*/*.mk))
