"""The bus: RabbitMQ topology, message codec and the pika adapter.

``topology`` names every exchange and queue; ``codec`` turns protobuf messages into JSON
bodies and back; ``amqp`` is the only module that imports pika.
"""
