defmodule Quichex.Application do
  @moduledoc false
  use Application

  @impl Application
  def start(_type, _args) do
    # Owned by the application master's process tree: lives as long as the app.
    Quichex.Config.create_cache()

    children = [
      {DynamicSupervisor, name: Quichex.ConnectionSupervisor, strategy: :one_for_one}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Quichex.Supervisor)
  end
end
