defmodule Quichex.Listener.Connections do
  @moduledoc false
  # A listener's supervisor of connections. Like every supervisor it would
  # crash on a call it does not know, so it registers itself
  # (Quichex.Call) and no Connection or Stream function calls it.

  use DynamicSupervisor

  def start_link(max_connections),
    do: DynamicSupervisor.start_link(__MODULE__, max_connections)

  @impl DynamicSupervisor
  def init(max_connections) do
    :ok = Quichex.Call.register(:listener_connections)
    DynamicSupervisor.init(strategy: :one_for_one, max_children: max_connections)
  end
end
