defmodule Quichex.Stream.Server do
  @moduledoc false
  # A stream's process: a small proc_lib loop (not a GenServer, so that its
  # connection's exit is an ordinary message, the receive side can hold
  # data back per `:active` mode, and a handler's callbacks can run here).
  #
  # The connection reads ahead for the stream within a credit (`window`
  # bytes) and sends `{:quic_data, data, fin?}`, `{:quic_reset, code}`,
  # `{:quic_stopped, code}`, `{:quic_send_done, :fin}` and
  # `{:quic_conn_closed, reason}`. The stream gives credit back as its
  # owner takes data (`Quichex.Stream.Receiver`).
  #
  # Sends are forwarded to the connection with the caller's `from`; the
  # connection answers the caller itself once quiche took every byte.
  #
  # The process ends when both directions are done: the end of the receive
  # side (FIN or reset) was delivered to the owner, and the sending side is
  # finished (our FIN accepted, stopped by the peer, or reset). Until then
  # every function answers; afterwards they answer `{:error, :closed}`.

  alias Quichex.{Call, Telemetry}
  alias Quichex.Stream.{HandlerRunner, Receiver}

  @owner_down_code 0x0101

  defstruct [
    :conn,
    :id,
    :direction,
    :initiator,
    :window,
    :started_at,
    # the owner pid (nil when a handler runs here) and its monitor
    :owner,
    :owner_ref,
    # %HandlerRunner{} when a Quichex.Handler serves this stream
    :handler,
    # receive side
    active: false,
    buffer: [],
    buffered: 0,
    fin: false,
    reset: nil,
    recv_done: false,
    reader: nil,
    granted: 0,
    # send side: :open, or how it ended (:fin, {:stopped, code}, :reset, :none)
    send: :open
  ]

  @type t :: %__MODULE__{}

  def owner_down_code, do: @owner_down_code

  @doc false
  def start_link(args), do: :proc_lib.spawn_link(__MODULE__, :init, [args])

  @doc false
  def init(args) do
    Process.flag(:trap_exit, true)

    state = %__MODULE__{
      conn: args.conn,
      id: args.id,
      direction: args.direction,
      initiator: args.initiator,
      window: args.window,
      granted: args.window,
      active: args.active,
      recv_done: not args.readable,
      send: if(args.writable, do: :open, else: :none)
    }

    meta = %{
      connection: state.conn,
      stream: self(),
      stream_id: state.id,
      initiator: state.initiator
    }

    state = %{state | started_at: Telemetry.start(:stream, meta)}
    Process.put(:quichex_stream, {state.conn, state.id, state.direction, state.initiator})

    case args.owner do
      # Waits for {:quichex_adopt, owner} (Quichex.ConnectionHandler).
      {:owner, nil} ->
        loop(state)

      {:owner, owner} ->
        state = %{state | owner: owner, owner_ref: Process.monitor(owner)}

        if state.initiator == :remote,
          do: send(owner, {:quic_stream_opened, state.conn, self(), state.direction})

        loop(state)

      {:handler, module, options} ->
        state |> HandlerRunner.open(module, options) |> next()
    end
  end

  ## The loop

  @doc false
  def next({:cont, state}), do: if(finished?(state), do: stop(state, :normal), else: loop(state))
  def next({:stop, reason, state}), do: stop(state, reason)

  defp loop(state) do
    receive do
      {:system, from, request} ->
        :sys.handle_system_msg(request, from, state.conn, __MODULE__, [], state)

      msg ->
        state |> handle(msg) |> next()
    after
      HandlerRunner.timeout(state.handler) ->
        state |> HandlerRunner.timeout_expired() |> next()
    end
  end

  defp finished?(state), do: state.recv_done and state.send != :open

  # The stream process ends here: the loop's way out.
  @spec stop(t(), term()) :: no_return()
  defp stop(state, reason) do
    Telemetry.stop(:stream, state.started_at, %{
      connection: state.conn,
      stream: self(),
      stream_id: state.id,
      reason: reason
    })

    exit(reason)
  end

  ## Messages

  defp handle(state, {:"$gen_call", {pid, _} = from, {:quichex_stream, request}})
       when is_pid(pid),
       do: call(request, from, state)

  # A call meant for another kind of process (a Quichex.Connection function
  # given a stream): answered, not taken for a stream request.
  defp handle(state, {:"$gen_call", {pid, _} = from, _request}) when is_pid(pid) do
    reply(from, Call.unknown_call())
    {:cont, state}
  end

  defp handle(state, {:quic_data, bin, fin}), do: Receiver.data(state, bin, fin)
  defp handle(state, {:quic_reset, code}), do: Receiver.reset(state, code)
  defp handle(state, {:quic_error, reason}), do: Receiver.failed(state, reason)

  defp handle(state, {:quic_stopped, code}) do
    state = %{state | send: {:stopped, code}}

    case state.handler do
      nil ->
        notify(state, {:quic_stream_stopped, state.conn, self(), code})
        {:cont, state}

      _ ->
        HandlerRunner.stopped(state, code)
    end
  end

  defp handle(state, {:quic_send_done, :fin}), do: {:cont, %{state | send: :fin}}

  # A stream the peer opened before its connection had a controlling
  # process: the new controlling process owns it from now on.
  defp handle(%{owner: nil, handler: nil} = state, {:quichex_adopt, owner}) do
    state = set_owner(state, owner)
    send(owner, {:quic_stream_opened, state.conn, self(), state.direction})
    Receiver.deliver(state)
  end

  defp handle(state, {:quichex_adopt, _owner}), do: {:cont, state}
  defp handle(state, {:quic_conn_closed, reason}), do: conn_gone(state, reason)

  defp handle(%{conn: conn} = state, {:EXIT, conn, reason}),
    do: conn_gone(state, {:connection_down, reason})

  defp handle(state, {:DOWN, ref, :process, _pid, _reason}) when ref == state.owner_ref,
    do: {:stop, {:shutdown, {:abort, @owner_down_code}}, state}

  defp handle(state, {:quichex_recv_timeout, ref}), do: Receiver.reader_timeout(state, ref)

  # Requests a handler made on its own stream from inside a callback.
  defp handle(state, {:quichex_self, request}), do: self_request(state, request)

  defp handle(%{handler: nil} = state, _other), do: {:cont, state}
  defp handle(state, other), do: HandlerRunner.info(state, other)

  ## Calls

  defp call({:send, bin, fin, timeout}, from, state) do
    case state.send do
      :open ->
        cast_conn(state, {:send, state.id, from, bin, fin, timeout})

      closed ->
        reply(from, {:error, send_error(closed)})
    end

    {:cont, state}
  end

  defp call({:recv, length, timeout}, from, state),
    do: Receiver.recv(state, from, length, timeout)

  # `active` nil: no option given, nothing changes.
  defp call({:setopts, nil}, from, state) do
    reply(from, :ok)
    {:cont, state}
  end

  defp call({:setopts, active}, from, state) do
    case state.handler do
      nil ->
        reply(from, :ok)
        Receiver.set_active(state, active)

      _ ->
        reply(from, {:error, :handler})
        {:cont, state}
    end
  end

  defp call({:shutdown, how, code}, from, state) do
    state = shutdown(state, how, code)
    reply(from, :ok)
    {:cont, state}
  end

  defp call({:controlling_process, caller, pid}, from, state) do
    cond do
      caller != state.owner ->
        reply(from, {:error, :not_owner})
        {:cont, state}

      not Call.alive?(pid) ->
        reply(from, {:error, :dead_owner})
        {:cont, state}

      true ->
        reply(from, :ok)
        {:cont, set_owner(state, pid)}
    end
  end

  defp call({:set_priority, urgency, incremental}, from, state) do
    cast_conn(state, {:priority, state.id, urgency, incremental})
    reply(from, :ok)
    {:cont, state}
  end

  defp call(:readable?, from, state) do
    pending_end? = (state.fin or state.reset != nil) and not state.recv_done
    reply(from, state.buffered > 0 or pending_end?)
    {:cont, state}
  end

  defp call(:info, from, state) do
    reply(from, {:ok, info(state)})
    {:cont, state}
  end

  defp call(_unknown, from, state) do
    reply(from, Call.unknown_call())
    {:cont, state}
  end

  ## Helpers shared with Receiver and HandlerRunner

  @doc false
  def info(state) do
    %{
      id: state.id,
      direction: state.direction,
      initiator: state.initiator,
      connection: state.conn,
      owner: state.owner || self()
    }
  end

  @doc false
  # Aborts `how` (:read, :write or :both) with `code`: STOP_SENDING for the
  # receive side, RESET_STREAM for the sending side, each unless already done.
  def shutdown(state, how, code) do
    dirs =
      [read: not state.recv_done, write: state.send == :open]
      |> Enum.filter(fn {dir, open?} -> open? and how in [dir, :both] end)
      |> Keyword.keys()

    if dirs != [], do: cast_conn(state, {:shutdown, state.id, dirs, code})
    apply_shutdown(state, dirs)
  end

  @doc false
  def apply_shutdown(state, dirs) do
    Enum.reduce(dirs, state, fn
      :read, acc -> Receiver.close(acc, {:error, :closed})
      :write, acc -> if acc.send == :open, do: %{acc | send: :reset}, else: acc
    end)
  end

  @doc false
  def set_owner(state, pid) do
    if state.owner_ref, do: Process.demonitor(state.owner_ref, [:flush])
    %{state | owner: pid, owner_ref: Process.monitor(pid), handler: nil}
  end

  defp self_request(state, {:shutdown, dirs}), do: {:cont, apply_shutdown(state, dirs)}

  defp self_request(state, {:controlling_process, pid}) do
    state = set_owner(state, pid)
    Receiver.deliver(state)
  end

  defp send_error(:fin), do: :finished
  defp send_error({:stopped, code}), do: {:stopped, code}
  defp send_error(_closed), do: :closed

  # The connection is gone (closed, or its process exited): tell the owner
  # unless the stream had finished, answer a waiting reader, end.
  defp conn_gone(state, reason) do
    if not finished?(state) and state.handler == nil,
      do: notify(state, {:quic_stream_closed, state.conn, self(), reason})

    state = Receiver.close(state, {:error, :closed})
    {:stop, :normal, %{state | send: :none}}
  end

  @doc false
  def notify(%{owner: owner}, msg) when is_pid(owner), do: send(owner, msg)
  def notify(_state, _msg), do: :ok

  @doc false
  def cast_conn(state, msg), do: :gen_statem.cast(state.conn, {:stream, msg})

  @doc false
  def reply({pid, _} = from, msg) when is_pid(pid), do: :gen.reply(from, msg)

  ## :sys callbacks

  @doc false
  def system_continue(_parent, _debug, state), do: loop(state)

  @doc false
  @spec system_terminate(term(), pid(), term(), t()) :: no_return()
  def system_terminate(reason, _parent, _debug, state), do: stop(state, reason)

  @doc false
  def system_get_state(state), do: {:ok, state}

  @doc false
  def system_replace_state(fun, state) do
    state = fun.(state)
    {:ok, state, state}
  end

  @doc false
  def system_code_change(state, _module, _old, _extra), do: {:ok, state}
end
