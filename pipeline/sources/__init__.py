"""Where data comes from: the fleet simulator today; NVML and MQTT collectors next."""
