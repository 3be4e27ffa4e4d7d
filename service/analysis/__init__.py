"""The analysis of one field: frame -> scale -> stain -> tiles -> detections -> merge -> ROI
-> crops -> classes -> aggregates -> report. `pipeline` is the only module that knows the order.

Imports neither the station nor MQTT.
"""
