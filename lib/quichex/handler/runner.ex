defmodule Quichex.Handler.Runner do
  @moduledoc false
  # Starts the processes that run a Quichex.Handler: one per connection (the
  # connection's controlling process) and one per peer-initiated stream,
  # both under the listener's handler supervisor.

  alias Quichex.Handler.{ConnectionServer, StreamServer}

  @doc false
  def start_connection_handler(sup, module, options) do
    case DynamicSupervisor.start_child(sup, {ConnectionServer, {module, options}}) do
      {:ok, pid} -> %{module: module, options: options, sup: sup, pid: pid}
      _ -> nil
    end
  end

  @doc false
  def owner(nil), do: nil
  def owner(%{pid: pid}), do: pid

  @doc false
  def attach(nil, _conn), do: :ok
  def attach(%{pid: pid}, conn), do: send(pid, {:quichex_attach, conn})

  @doc false
  def abandon(nil), do: :ok
  def abandon(%{pid: pid, sup: sup}), do: DynamicSupervisor.terminate_child(sup, pid)

  @doc false
  def start_stream_handler(%{module: module, options: options, sup: sup}, conn, _id) do
    DynamicSupervisor.start_child(sup, {StreamServer, {module, options, conn}})
  end
end
