defmodule Quichex.Listener.Sockets do
  @moduledoc false
  # A listener's supervisor of socket processes: each restarts on its own
  # (the port, the routes and the counters are in the listener's shared
  # tables). Like every supervisor it would crash on a call it does not
  # know, so it registers itself (Quichex.Call) and no Connection or Stream
  # function calls it.

  use Supervisor

  def start_link(children), do: Supervisor.start_link(__MODULE__, children)

  @impl Supervisor
  def init(children) do
    :ok = Quichex.Call.register(:listener_sockets)
    Supervisor.init(children, strategy: :one_for_one, max_restarts: 10, max_seconds: 10)
  end
end
