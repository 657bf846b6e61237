defmodule Quichex.Call do
  @moduledoc false
  # How the public API calls Quichex processes. A function given the wrong
  # pid (a stream where a connection is expected, a listener, a dead
  # process, the caller itself) answers with an error, and the process it
  # was given carries on:
  #
  #   * A listener's supervisors (the listener and the supervisor of its
  #     connections) crash on a call they do not know, as every OTP
  #     supervisor does. They register here when they start (register/1),
  #     and call/4 never calls a registered process.
  #   * Every other Quichex process (a connection, a stream, a listener's
  #     socket process, a handler's connection process) answers a call it
  #     does not understand with unknown_call/0 and carries on. Stream and
  #     listener requests are tagged ({:quichex_stream, request},
  #     {:quichex_listener, request}), so no request of one kind means
  #     something to another.
  #
  # call/4 turns both cases into `{:error, wrong_kind}` (`:not_a_connection`,
  # `:not_a_stream`), an exit into `{:error, :closed}` and a timeout into
  # `{:error, :timeout}`.
  #
  # The registered pids live in a protected ETS table read by every call (a
  # lookup, no exception on a miss: well under a microsecond). This
  # process owns it, monitors each registered process and forgets it when
  # it exits.

  use GenServer

  @table __MODULE__
  @unknown_call {:error, :unknown_call}

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc "Registers the calling process as a `kind` of process call/4 must never call."
  def register(kind), do: GenServer.call(__MODULE__, {:register, self(), kind})

  @doc "The kind `pid` registered as (`:listener`, `:listener_connections`), or nil."
  def kind(pid) when is_pid(pid) do
    case :ets.lookup(@table, pid) do
      [{^pid, kind}] -> kind
      [] -> nil
    end
  end

  @doc """
  Cancels the deadline timer of a waiting call (`nil`: the call has none).
  A timer that fired already left its message, which the waiting side tells
  apart by its ref and ignores once the call is answered, so the result of
  the cancel does not matter.
  """
  @spec cancel_timer(reference() | nil) :: :ok
  def cancel_timer(nil), do: :ok

  def cancel_timer(timer) do
    _ = :erlang.cancel_timer(timer, async: true, info: false)
    :ok
  end

  @doc "What a Quichex process answers to a call it does not understand."
  def unknown_call, do: @unknown_call

  @doc """
  Whether `pid` can be alive: a live local process, or a process on a node
  we are connected to (whether it lives there is not known without asking).
  """
  def alive?(pid) when is_pid(pid) and node(pid) == node(), do: Process.alive?(pid)
  def alive?(pid) when is_pid(pid), do: node(pid) in Node.list()

  @doc """
  Calls `pid` with `request` (`timeout` already validated, grace included).
  `{:error, wrong_kind}` when `pid` is not the kind of process the request
  is for.
  """
  def call(pid, request, timeout, wrong_kind) when is_pid(pid) do
    if pid == self() or kind(pid) != nil do
      {:error, wrong_kind}
    else
      try do
        case :gen.call(pid, :"$gen_call", request, timeout) do
          {:ok, @unknown_call} -> {:error, wrong_kind}
          {:ok, reply} -> reply
        end
      catch
        :exit, :timeout -> {:error, :timeout}
        :exit, _gone -> {:error, :closed}
      end
    end
  end

  ## The table's owner

  @impl GenServer
  def init(nil) do
    @table = :ets.new(@table, [:named_table, :protected, :set, read_concurrency: true])
    {:ok, nil}
  end

  @impl GenServer
  def handle_call({:register, pid, kind}, _from, state) do
    Process.monitor(pid)
    :ets.insert(@table, {pid, kind})
    {:reply, :ok, state}
  end

  @impl GenServer
  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    :ets.delete(@table, pid)
    {:noreply, state}
  end
end
