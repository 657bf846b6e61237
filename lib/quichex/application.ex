defmodule Quichex.Application do
  @moduledoc false
  use Application

  @impl Application
  def start(_type, _args) do
    # Owned by the application master's process tree: lives as long as the app.
    :ok = Quichex.Config.create_cache()
    :ok = Quichex.Connection.Datagrams.create_table()

    children = [
      # The listeners' supervisors, which the API must never call by
      # mistake (Quichex.Call).
      Quichex.Call,
      # Client connections, partitioned per scheduler so concurrent connects
      # do not queue behind one supervisor.
      {PartitionSupervisor, child_spec: DynamicSupervisor, name: Quichex.ConnectionSupervisor}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Quichex.Supervisor)
  end
end
