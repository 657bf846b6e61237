defmodule :telemetry do
  @moduledoc false
  # A small stand-in for the :telemetry library (Hex is unreachable here):
  # just enough of its API for Quichex.Telemetry and the tests to attach
  # handlers. Real applications use the real library.

  def attach(id, event, fun, config), do: attach_many(id, [event], fun, config)

  def attach_many(id, events, fun, config) do
    handlers = :persistent_term.get(__MODULE__, %{})
    :persistent_term.put(__MODULE__, Map.put(handlers, id, {events, fun, config}))
    :ok
  end

  def detach(id) do
    handlers = :persistent_term.get(__MODULE__, %{})
    :persistent_term.put(__MODULE__, Map.delete(handlers, id))
    :ok
  end

  def execute(event, measurements, metadata) do
    for {_id, {events, fun, config}} <- :persistent_term.get(__MODULE__, %{}), event in events do
      fun.(event, measurements, metadata, config)
    end

    :ok
  end
end
