include $(sort $(wildcard $(BR2_EXTERNAL_BLOCKSWARM_PATH)/package/*/*.mk))
