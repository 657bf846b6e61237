defmodule Quichex.Test.LogWatch do
  @moduledoc false
  # An Erlang :logger handler that records every event of level error or
  # above, from any process: also the crash, supervisor and gen_statem
  # reports Elixir's Logger leaves out by default (handle_sasl_reports:
  # false), so ExUnit.CaptureLog alone would not see them.

  @doc "Starts watching; returns the watch. The caller owns the event table."
  def start do
    table = :ets.new(__MODULE__, [:public, :duplicate_bag])
    id = :"quichex_log_watch_#{System.unique_integer([:positive])}"
    :ok = :logger.add_handler(id, __MODULE__, %{level: :error, config: %{table: table}})
    {id, table}
  end

  @doc "Stops watching."
  def stop({id, _table}) do
    _ = :logger.remove_handler(id)
    :ok
  end

  @doc "The events recorded so far, oldest first."
  def events({_id, table}) do
    table |> :ets.tab2list() |> Enum.sort_by(&elem(&1, 0)) |> Enum.map(&elem(&1, 1))
  end

  @doc "Forgets the events recorded so far."
  def clear({_id, table}), do: :ets.delete_all_objects(table)

  @doc "An event, short enough for a failure message."
  def describe(%{level: level, msg: msg, meta: meta}) do
    "#{level} from #{inspect(meta[:pid])}: #{inspect(msg, limit: 12, printable_limit: 400)}"
  end

  ## :logger handler callback (runs in the process that logs)

  @doc false
  def log(event, %{config: %{table: table}}) do
    :ets.insert(table, {System.unique_integer([:monotonic]), event})
  rescue
    # The table is gone with its test: nothing to record into.
    ArgumentError -> :ok
  end
end
